"""A default run is the lower layers' defaults: the model, device and data a run builds from
RunConfig() are those of Hyper(), DevicePolicy(), SyntheticSpec() and load_split's defaults,
so a default set in one place cannot drift from the one the other uses."""

from __future__ import annotations

import dataclasses

import numpy as np

from fedrec.datasets import SyntheticSpec, load_split
from fedrec.models.defaults import BPMF_DIM, BPMF_REG, DEFAULT_REG, Hyper
from fedrec.privacy.policy import DevicePolicy
from fedrec.run.build import hyper, load_data, synthetic_spec
from fedrec.run.config import RunConfig


def test_a_default_run_builds_the_default_model_device_and_data():
    cfg = RunConfig()
    # --model auto runs BPMF on a plain default run: its own K and prior, everything else Hyper()'s
    assert hyper(cfg) == dataclasses.replace(Hyper(), model="bpmf", dim=BPMF_DIM, **BPMF_REG)
    assert hyper(dataclasses.replace(cfg, model="mf")) == Hyper()
    assert cfg.device_policy(cfg.seed) == DevicePolicy()
    assert synthetic_spec(cfg) == SyntheticSpec()


def test_an_implicit_run_takes_the_implicit_regularization():
    implicit = {name: pair[1] for name, pair in DEFAULT_REG.items()}
    assert hyper(RunConfig(split="loo")) == dataclasses.replace(Hyper(), implicit=True, **implicit)


def test_a_default_run_loads_the_default_split():
    ours, theirs = load_data(RunConfig()), load_split("synthetic")
    assert (ours.split, ours.n_users, ours.n_items) == (theirs.split, theirs.n_users, theirs.n_items)
    for side in ("train", "test"):
        for column in ("user", "item", "rating"):
            np.testing.assert_array_equal(getattr(getattr(ours, side), column), getattr(getattr(theirs, side), column))
