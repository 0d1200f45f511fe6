"""Shared fixtures: the shared MovieLens copy, small synthetic configs, tiny MovieLens files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedrec.datasets.movielens import FORMATS
from fedrec.run.config import RunConfig

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("FEDREC_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "ml-100k" / "u.data").is_file():
        pytest.skip(f"MovieLens 100K not found at {SHARED_DATA}/ml-100k (set FEDREC_TEST_DATA)")
    return SHARED_DATA


@pytest.fixture
def small_cfg(tmp_path) -> RunConfig:
    """A synthetic population small enough for in-process federated runs in ~1 s."""
    # model mf: these tests exercise the SGD path (optimizer, local epochs, partial participation);
    # --model auto would run BPMF on this plain full-participation set-up (tests/models/test_bpmf.py covers it)
    return RunConfig(dataset="synthetic", synthetic_users=60, synthetic_items=40, synthetic_density=0.2,
                     model="mf", dim=8, rounds=6, epochs=6, eval_every=3, out=str(tmp_path / "run"))


ROWS = [(10, 100, 4, 881250949), (10, 200, 3, 881250950), (20, 100, 5, 881250951), (30, 300, 1, 881250952)]


def write_movielens(root, name, rows=ROWS):
    """Write a tiny data set in `name`'s native format under root; returns its folder."""
    fmt = FORMATS[name]
    folder = root / fmt.folder
    folder.mkdir(parents=True, exist_ok=True)
    sep = fmt.separator
    lines = ["userId,movieId,rating,timestamp"] if fmt.header else []
    lines += [sep.join(str(v) for v in row) for row in rows]
    (folder / fmt.ratings_file).write_text("\n".join(lines) + "\n")
    titles = {"u.item": "100|Toy Story (1995)|x\n200|GoldenEye (1995)|x\n300|Heat (1995)|x\n",
              "movies.dat": "100::Toy Story (1995)::Animation\n200::GoldenEye (1995)::Action\n"
                            "300::Heat (1995)::Crime\n",
              "movies.csv": "movieId,title,genres\n100,Toy Story (1995),Animation\n"
                            "200,\"GoldenEye, The (1995)\",Action\n"
                            "300,Heat (1995),Crime\n"}
    (folder / fmt.titles_file).write_text(titles[fmt.titles_file], encoding="latin-1")
    return folder


@pytest.fixture
def write_dataset():
    return write_movielens


def pytest_collection_modifyitems(items):
    """Under pytest-xdist (`--dist loadgroup`), one worker runs every engine test in turn: each starts Ray or
    SuperLinks sized for the whole machine, and two at once would only slow each other down."""
    for item in items:
        if item.get_closest_marker("engine"):
            item.add_marker(pytest.mark.xdist_group("engine"))


@pytest.fixture(scope="session", autouse=True)
def shard_cache(tmp_path_factory):
    """Shard sets cut during the tests go to one temporary cache, not ~/.cache (shared by the
    tests of a session: a set is keyed by its data, split and node count)."""
    previous = os.environ.get("FEDREC_SHARD_CACHE")
    os.environ["FEDREC_SHARD_CACHE"] = str(tmp_path_factory.mktemp("shards"))
    yield Path(os.environ["FEDREC_SHARD_CACHE"])
    if previous is None:
        os.environ.pop("FEDREC_SHARD_CACHE", None)
    else:
        os.environ["FEDREC_SHARD_CACHE"] = previous


@pytest.fixture(autouse=True)
def no_internet_downloads(tmp_path, monkeypatch):
    """Tests never reach GroupLens: downloads point at an empty local folder."""
    monkeypatch.setenv("FEDREC_MOVIELENS_URL", (tmp_path / "no-mirror").as_uri())


# ---------------------------------------------------------------- the server's side, without a grid
def mf_algorithm(n_items: int, dim: int, **settings):
    """Biased MF for a catalogue of `n_items` on a 1-5 scale (what most server-side tests aggregate)."""
    from fedrec.models.defaults import Hyper
    from fedrec.models.mf import MF

    return MF(Hyper(dim=dim, **settings), n_items, (1.0, 5.0))


def federation(cfg: RunConfig, n_items: int, dim: int, population: int, privacy=None, init_std: float = 0.1):
    """A Federation over one node hosting `population` users, with MF's state (cfg's optimizer)."""
    import numpy as np

    from fedrec.server.directory import NodeDirectory
    from fedrec.server.federation import Federation

    algorithm = mf_algorithm(n_items, dim, init_std=init_std)
    directory = NodeDirectory(np.array([1], np.uint64), np.array([0]), np.array([population]), population, n_items,
                              (1.0, 5.0))
    return Federation(cfg, algorithm, algorithm.init_server(cfg.strategy, cfg.server_lr), directory, privacy=privacy)


def mf_reply(users: float, n_items: int, dim: int, value: float = 0.0, node: int = 1, metrics: dict | None = None):
    """A train reply as an MF device sends it (dense), every coordinate `value`."""
    from unittest.mock import Mock

    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from fedrec.models.factors import GLOBAL_BIAS, ITEM_BIAS, ITEM_EMB
    from fedrec.run import schema

    arrays = ArrayRecord({ITEM_EMB: Array(np.full((n_items, dim), value, np.float32)),
                          ITEM_BIAS: Array(np.full((n_items, 1), value, np.float32)),
                          GLOBAL_BIAS: Array(np.full(1, value, np.float32))})
    reply = Mock(spec=Message)
    reply.has_error.return_value = False
    reply.content = RecordDict({schema.ARRAYS: arrays, schema.METRICS: MetricRecord(
        metrics if metrics is not None else {schema.WEIGHT: users, "loss-sum": 0.0, "num-rows": 1})})
    reply.metadata.src_node_id = node
    return reply


def round_config(cfg: RunConfig, round_: int, users, noise_share: float = 0.0):
    """A round's config record as the server sends it: the device's part of `cfg` and the round's keys."""
    from flwr.app import ConfigRecord

    from fedrec.run import device_config

    return ConfigRecord(device_config.round_config(cfg.resolved(), round_, users, noise_share))
