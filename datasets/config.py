"""The data part of a run's config: which data set, which split, and the seed of everything the data
decides. Owned here, where it is read; validated on its own (`check_data`)."""

from __future__ import annotations

from dataclasses import dataclass

from fedrec.run.setting import ConfigError, check_limits, check_signs, setting

from .names import DATASETS, DEFAULT_SPLIT, SPLITS, TEST_FRACTION, TEST_NEGATIVES, SyntheticSpec

_SYNTHETIC = SyntheticSpec()
LIMITS = {"synthetic_users": 100_000_000, "synthetic_items": 10_000_000, "synthetic_rank": 1024, "negatives": 100_000}


def _data(default, help, choices=None, internal=False):
    return setting("Data", default, help, choices, internal)


def _synthetic(default, help):
    return setting("Synthetic data", default, help)


@dataclass(frozen=True)
class DataConfig:
    """Which data, how it is split and scored, and the seed of everything the data decides."""

    dataset: str = _data("synthetic", "Data set: synthetic (embedded, no download) or a MovieLens name.", DATASETS)
    data_dir: str = _data("", "Data root holding <name>/ folders; empty: $FEDREC_DATA_DIR, else ~/.cache/fedrec.")
    split: str = _data(DEFAULT_SPLIT, "random (per-user holdout), loo (leave-one-out, implicit), or u1..u5 (ml-100k).",
                       SPLITS)
    test_fraction: float = _data(TEST_FRACTION, "Share of each user's ratings held out by the random split.")
    negatives: int = _data(TEST_NEGATIVES, "Sampled negatives per test positive for leave-one-out evaluation.")
    validation: bool = _data(False, "Score on a validation split cut from the training rows alone (per user: "
                                    "--test-fraction of them; --split loo: the latest one) instead of the test set, "
                                    "whose rows are then never used; what `fedrec tune` does.")
    validation_item: bool = _data(False, "Leave-one-out: hold out each user's latest training interaction too, as a "
                                         "validation item with its own --negatives; every evaluation scores both, and "
                                         "the run reports the test metrics of its best-validation round (the protocol "
                                         "of NCF and PFedRec).")
    heldout_not_negative: bool = _data(False, "Leave-one-out: a user's held-out items (test and validation) are never "
                                              "its training negatives, as in the code of NCF and PFedRec, which draw "
                                              "them from items the user never interacted with in the whole data set. "
                                              "A leak a real device cannot have (it does not know its future items): "
                                              "for reproducing those papers' numbers only.")
    synthetic_users: int = _synthetic(_SYNTHETIC.users, "Synthetic data: number of users.")
    synthetic_items: int = _synthetic(_SYNTHETIC.items, "Synthetic data: number of items.")
    synthetic_density: float = _synthetic(_SYNTHETIC.density, "Synthetic data: expected share of user-item pairs "
                                          "rated.")
    synthetic_rank: int = _synthetic(_SYNTHETIC.rank, "Synthetic data: rank of the true preference matrix.")
    synthetic_noise: float = _synthetic(_SYNTHETIC.noise, "Synthetic data: std of rating noise before rounding to "
                                        "stars.")
    seed: int = _data(0, "Seed of the data, split, init, negatives and non-DP sampling (DP noise, decoys and DP "
                         "sampling use OS entropy unless --reproducible-noise).")
    tuned: bool = _data(False, "Set by fedrec tune in the settings it chooses (and by compare --tune): they were "
                        "chosen on this data's training rows without noise, so a DP run lists them as not covered.",
                        internal=True)

    @property
    def implicit(self) -> bool:
        """Leave-one-out splits are implicit feedback: ranked, not rated."""
        return self.split == "loo"

    def check_data(self) -> None:
        check_signs(self, positive=("negatives", "synthetic_users", "synthetic_items", "synthetic_rank"),
                    non_negative=("synthetic_noise",))
        check_limits(self, LIMITS)
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be between 0 and 2**63 - 1 (got {self.seed})")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test-fraction must be between 0 and 1 (got {self.test_fraction})")
        if not 0 < self.synthetic_density <= 1:
            raise ConfigError(f"synthetic-density must be in (0, 1] (got {self.synthetic_density})")
        if self.heldout_not_negative and self.split != "loo":
            raise ConfigError("heldout-not-negative is about leave-one-out's training negatives: use --split loo")
        if self.validation_item and (self.split != "loo" or self.validation):
            raise ConfigError("validation-item needs --split loo and no --validation (it holds out its own "
                              "validation item)")
        if self.split.startswith("u") and self.dataset != "ml-100k":
            raise ConfigError(f"split {self.split} exists only for ml-100k; use --split random or loo")
