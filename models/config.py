"""The model part of a run's config: which algorithm and its settings. Owned here, validated on its own
(`check_model`); `hyper` resolves it (the algorithm `--model auto` picks, the defaults marked -1) into
what a device receives. Plain Python: the algorithms themselves are imported only to resolve."""

from __future__ import annotations

from dataclasses import dataclass

from fedrec.run.setting import ConfigError, check_limits, check_signs, kebab, setting

from .defaults import BPMF_DIM, DEFAULT_REG, MODELS, Hyper

_HYPER = Hyper()
LIMITS = {"dim": 8192, "train_negatives": 1000, "recency_items": 10_000}


def _model(default, help, choices=None):
    return setting("Model", default, help, choices)


def _reg_help(what: str, name: str) -> str:
    ratings, implicit = DEFAULT_REG[name]
    return f"L2 on {what}, per rating; -1: {ratings} (ratings) or {implicit} (implicit) under MF."


@dataclass(frozen=True)
class ModelConfig:
    """Which algorithm a device trains and with what: what each device receives, resolved."""

    model: str = _model("auto", "auto: the first of bpmf, dpstats, mf that admits every privacy option the run "
                                "asks for (bpmf won on validation but admits none, needs ratings and every user in "
                                "every round; dpstats where DP is asked, on ratings, with every user in every round "
                                "and no --clipping-norm); mf: biased matrix factorization; svdpp: adds implicit "
                                "factors y_j of the items a user rated; bpmf: Bayesian MF by Gibbs sampling, one sweep "
                                "per round; dpstats: private sufficient statistics, 2 or 3 releases (its defaults "
                                "and rounds are a rule of epsilon); the published federated recommenders: pfedrec (a "
                                "personal score function per device), fcf (federated implicit ALS), fedrecon (devices "
                                "keep no state and reconstruct the user's vector each round). docs/design.md lists "
                                "what each sends.",
                        ("auto", *MODELS))
    dim: int = _model(-1, f"Embedding size K of users and items; -1: the algorithm's own ({BPMF_DIM} for bpmf, "
                          f"{_HYPER.dim} otherwise; chosen on validation).")
    reg_user: float = _model(-1.0, _reg_help("user embeddings", "reg_user"))
    reg_item: float = _model(-1.0, _reg_help("item embeddings", "reg_item"))
    reg_bias: float = _model(-1.0, _reg_help("user and item biases", "reg_bias"))
    init_std: float = _model(_HYPER.init_std, "Std of the initial embeddings.")
    train_negatives: int = _model(_HYPER.train_negatives, "Implicit feedback: sampled negatives per positive in "
                                  "training.")
    recency_items: int = _model(_HYPER.recency_items, "Implicit feedback: a device ranks with its user's latest this "
                                "many training interactions too (by its own timestamps, which never leave it; "
                                "training is unchanged).")
    recency_decay: float = _model(_HYPER.recency_decay, "Implicit feedback: the k-th latest of those items weighs "
                                                        "decay^k in the user's recent profile (in [0, 1]).")
    recency_weight: float = _model(_HYPER.recency_weight, "Implicit feedback: weight of the recent profile's match "
                                   "with each item's direction in the device's scores; 0: off.")
    bpmf_alpha: float = _model(_HYPER.bpmf_alpha, "BPMF: precision of the rating noise (1 / its variance).")
    burn_in: int = _model(_HYPER.burn_in, "BPMF: first rounds (central: epochs) whose draws are not averaged into the "
                                          "model that is evaluated and saved (at most half of them).")
    item_lr_scale: float = _model(_HYPER.item_lr_scale, "PFedRec: a device's SGD step on its item embeddings is lr x "
                                  "number of items x this (its official code's lr_eta).")
    recon_fraction: float = _model(_HYPER.recon_fraction, "FedRecon: share of a user's training rows (drawn afresh "
                                   "each round) that reconstruct its vector; the rest train the items.")
    confidence: float = _model(_HYPER.confidence, "FCF: confidence of an interaction is 1 + this (alpha of "
                                                  "confidence-weighted ALS); unobserved items weigh 1.")
    lr: float = setting("Training", _HYPER.lr, "Client learning rate: Adam on the user's own vector, SGD on its item "
                                               "copies.")
    local_epochs: int = setting("Training", _HYPER.local_epochs, "Full-batch passes each sampled user makes over its "
                                "own ratings per round.")
    local_batch: int = setting("Training", -1, "Rows per local SGD step of a user (PFedRec); 0: one full-batch step "
                               "per local epoch; -1: the algorithm's own (256 for pfedrec, as its official code).")

    def check_model(self) -> None:
        check_signs(self, positive=("lr", "local_epochs", "train_negatives", "recency_items", "bpmf_alpha",
                                    "item_lr_scale"),
                    non_negative=("init_std", "recency_weight", "burn_in", "confidence"))
        check_limits(self, LIMITS)
        for name in ("reg_user", "reg_item", "reg_bias", "dim", "local_batch"):
            if getattr(self, name) < 0 and getattr(self, name) != -1:
                raise ConfigError(f"{kebab(name)} must be >= 0, or -1 for the default (got {getattr(self, name)})")
        if not 0 < self.recon_fraction < 1:
            raise ConfigError(f"recon-fraction must be between 0 and 1 (got {self.recon_fraction})")
        if not 0 <= self.recency_decay <= 1:
            raise ConfigError(f"recency-decay must be in [0, 1] (got {self.recency_decay})")


def with_defaults(model: ModelConfig, name: str, implicit: bool) -> dict:
    """The settings the algorithm `name` fills where they are -1 (its K and regularization)."""
    from .registry import algorithm_class  # the algorithms import torch: only once a run resolves

    # local_batch is read by few algorithms: one that does not name it trains in full batches (Hyper's 0)
    defaults = {"local_batch": Hyper.local_batch, **algorithm_class(name).defaults(implicit)}
    return {k: v for k, v in defaults.items() if getattr(model, k) < 0}
