"""A user's own recommendations: the device's exact fit against the global item model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.models.defaults import Hyper
from fedrec.models.factors import GLOBAL_BIAS, ITEM_BIAS, ITEM_EMB
from fedrec.models.mf import MF


def _model(n_items=30, dim=4, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {ITEM_EMB: torch.randn(n_items, dim, generator=gen), ITEM_BIAS: torch.randn(n_items, generator=gen) * 0.3,
            GLOBAL_BIAS: torch.tensor([3.5])}


def _mf(model, **settings) -> MF:
    return MF(Hyper(**settings), model[ITEM_EMB].shape[0], (1.0, 5.0))


def _loss(model, item, rating, hyper, emb, bias):
    pred = (model[GLOBAL_BIAS].double() + bias + model[ITEM_BIAS].double()[item]
            + model[ITEM_EMB].double()[item] @ emb)
    n = len(item)
    return float(((pred - torch.as_tensor(rating).double()) ** 2).sum() + n * hyper.reg_user * (emb @ emb)
                 + n * hyper.reg_bias * bias ** 2)


def test_the_fit_is_the_minimum_of_local_trainings_objective():
    model = _model()
    algorithm = _mf(model, dim=4)
    item, rating = np.array([1, 4, 7, 9, 12]), np.array([5.0, 1.0, 4.0, 2.0, 5.0])
    fit = algorithm.fit_user(model, item, rating)
    emb, bias = fit.emb[0].double(), float(fit.bias[0])
    best = _loss(model, torch.as_tensor(item), rating, algorithm.settings, emb, bias)
    rng = np.random.default_rng(0)
    for _ in range(200):  # every nearby point is worse
        near = emb + torch.as_tensor(rng.normal(0, 1e-2, 4))
        assert _loss(model, torch.as_tensor(item), rating, algorithm.settings, near, bias + rng.normal(0, 1e-2)) > best


def test_recommendations_exclude_what_the_user_rated_and_follow_the_fitted_taste():
    model = _model(n_items=40)
    algorithm = _mf(model, dim=4, reg_user=0.01, reg_bias=0.01)
    liked = np.argsort(-model[ITEM_EMB][:, 0].numpy())[:6]  # items high on factor 0
    disliked = np.argsort(model[ITEM_EMB][:, 0].numpy())[:6]
    item = np.concatenate([liked, disliked])
    rating = np.concatenate([np.full(6, 5.0), np.full(6, 1.0)])
    fit = algorithm.fit_user(model, item, rating)
    best, scores = algorithm.top_n(model, fit, item, 10)
    assert len(best) == 10 and not set(best) & set(item)
    assert np.all(np.diff(scores) <= 0) and scores.min() >= 1.0 and scores.max() <= 5.0
    assert fit.emb[0, 0] > 0  # the fitted vector points at what the user liked
    recommended = algorithm.recommend(model, item, rating, 10)  # fit and top-N in one call: the same list
    np.testing.assert_array_equal(recommended[0], best)
    np.testing.assert_allclose(recommended[1], scores)


def test_a_user_without_ratings_cannot_be_fitted():
    model = _model()
    with pytest.raises(ValueError, match="no ratings"):
        _mf(model, dim=4).fit_user(model, np.array([], dtype=np.int64), np.array([]))


def test_the_saved_model_carries_the_public_item_catalogue_where_the_writer_has_it(tmp_path, write_dataset, small_cfg):
    import dataclasses

    from fedrec.client.app import app as client_app
    from fedrec.models.saved import load_catalogue, load_model
    from fedrec.run.config import RunConfig
    from fedrec.server.runner import run_server
    from fedrec.simulations.central import run_central
    from fedrec.simulations.inprocess import InProcessGrid

    write_dataset(tmp_path / "data", "ml-1m")
    cfg = RunConfig(dataset="ml-1m", data_dir=str(tmp_path / "data"), epochs=2, eval_every=2, dim=4,
                    out=str(tmp_path / "central"))
    run_central(cfg)
    ids, titles = load_catalogue(tmp_path / "central")
    assert ids.tolist() == [100, 200, 300]
    assert titles.tolist() == ["Toy Story (1995)", "GoldenEye (1995)", "Heat (1995)"]
    model = load_model(tmp_path / "central")
    assert not {"item-ids", "titles"} & set(model) and model[ITEM_EMB].shape == (3, 4)  # the catalogue: no parameter

    federated = dataclasses.replace(small_cfg, rounds=1, eval_every=1)
    run_server(InProcessGrid(client_app, 2), federated, catalogue=(np.arange(40) + 1000, None))
    ids, titles = load_catalogue(federated.out)
    assert ids.tolist() == list(range(1000, 1040)) and titles is None
    run_server(InProcessGrid(client_app, 2), dataclasses.replace(federated, out=str(tmp_path / "plain")))
    assert load_catalogue(tmp_path / "plain") == (None, None)  # a server alone reads no data: no catalogue
