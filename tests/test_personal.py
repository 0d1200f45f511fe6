"""A user's own recommendations: the device's exact fit against the global item model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.models import Hyper, ItemParams
from fedrec.models.personal import fit_user, top_n


def _items(n_items=30, dim=4, seed=0) -> ItemParams:
    gen = torch.Generator().manual_seed(seed)
    return ItemParams(torch.randn(n_items, dim, generator=gen), torch.randn(n_items, generator=gen) * 0.3,
                      torch.tensor([3.5]))


def _loss(items, item, rating, hyper, emb, bias):
    pred = items.global_bias.double() + bias + items.bias.double()[item] + items.emb.double()[item] @ emb
    n = len(item)
    return float(((pred - torch.as_tensor(rating).double()) ** 2).sum() + n * hyper.reg_user * (emb @ emb)
                 + n * hyper.reg_bias * bias ** 2)


def test_the_fit_is_the_minimum_of_local_trainings_objective():
    items, hyper = _items(), Hyper(dim=4)
    item, rating = np.array([1, 4, 7, 9, 12]), np.array([5.0, 1.0, 4.0, 2.0, 5.0])
    fit = fit_user(items, item, rating, hyper)
    best = _loss(items, torch.as_tensor(item), rating, hyper, torch.as_tensor(fit.emb).double(), fit.bias)
    rng = np.random.default_rng(0)
    for _ in range(200):  # every nearby point is worse
        emb = torch.as_tensor(fit.emb).double() + torch.as_tensor(rng.normal(0, 1e-2, 4))
        assert _loss(items, torch.as_tensor(item), rating, hyper, emb, fit.bias + rng.normal(0, 1e-2)) > best


def test_recommendations_exclude_what_the_user_rated_and_follow_the_fitted_taste():
    items, hyper = _items(n_items=40), Hyper(dim=4, reg_user=0.01, reg_bias=0.01)
    liked = np.argsort(-items.emb[:, 0].numpy())[:6]  # items high on factor 0
    disliked = np.argsort(items.emb[:, 0].numpy())[:6]
    item = np.concatenate([liked, disliked])
    fit = fit_user(items, item, np.concatenate([np.full(6, 5.0), np.full(6, 1.0)]), hyper)
    best, scores = top_n(items, fit, exclude=item, n=10, rating_scale=(1.0, 5.0))
    assert len(best) == 10 and not set(best) & set(item)
    assert np.all(np.diff(scores) <= 0) and scores.min() >= 1.0 and scores.max() <= 5.0
    assert fit.emb[0] > 0  # the fitted vector points at what the user liked


def test_a_user_without_ratings_cannot_be_fitted():
    with pytest.raises(ValueError, match="no ratings"):
        fit_user(_items(), np.array([], dtype=np.int64), np.array([]), Hyper(dim=4))


def test_the_saved_model_carries_the_public_item_catalogue_where_the_writer_has_it(tmp_path, write_dataset, small_cfg):
    import dataclasses

    from fedrec.client.app import app as client_app
    from fedrec.models.saved import load_catalogue, load_model
    from fedrec.run.config import RunConfig
    from fedrec.server.app import run_server
    from fedrec.simulations.central import run_central
    from fedrec.simulations.inprocess import InProcessGrid

    write_dataset(tmp_path / "data", "ml-1m")
    cfg = RunConfig(dataset="ml-1m", data_dir=str(tmp_path / "data"), epochs=2, eval_every=2, dim=4,
                    out=str(tmp_path / "central"))
    run_central(cfg)
    ids, titles = load_catalogue(tmp_path / "central")
    assert ids.tolist() == [100, 200, 300]
    assert titles.tolist() == ["Toy Story (1995)", "GoldenEye (1995)", "Heat (1995)"]
    assert load_model(tmp_path / "central").emb.shape == (3, 4)  # the catalogue is not part of the parameters

    federated = dataclasses.replace(small_cfg, rounds=1, eval_every=1)
    run_server(InProcessGrid(client_app, 2), federated, catalogue=(np.arange(40) + 1000, None))
    ids, titles = load_catalogue(federated.out)
    assert ids.tolist() == list(range(1000, 1040)) and titles is None
    run_server(InProcessGrid(client_app, 2), dataclasses.replace(federated, out=str(tmp_path / "plain")))
    assert load_catalogue(tmp_path / "plain") == (None, None)  # a server alone reads no data: no catalogue
