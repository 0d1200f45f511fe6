"""The one run configuration of fedrec, with every field documented.

Sources, later ones winning: defaults here, `[tool.flwr.app.config]` / a TOML file, CLI
flags. Keys are kebab-case outside Python (`users-per-round`), snake_case inside.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# Only the lower layers' plain-Python modules: the command line builds its options from this
# module, and must not wait for numpy, pandas or torch to print its help.
from fedrec.datasets.names import (
    DATASETS,
    DEFAULT_SPLIT,
    KNOWN_SIZES,
    SPLITS,
    TEST_FRACTION,
    TEST_NEGATIVES,
    SyntheticSpec,
)
from fedrec.models.defaults import (
    BPMF_DIM,
    BPMF_REG,
    DEFAULT_REG,
    DEFAULT_SERVER_LR,
    DEFAULT_SERVER_OPTIMIZER,
    DEFAULT_TOP_K,
    MODELS,
    SERVER_OPTIMIZERS,
    UPDATE_MODES,
    DevicePolicy,
    Hyper,
)


class ConfigError(ValueError):
    """A bad setting; the message says which and what to do."""


# Each field's group: its panel in the command line's help (and the part of the config it belongs to).
GROUPS = ("Data", "Synthetic data", "Model", "Training", "Privacy", "Reliability", "Engine", "Output")


def _group(name: str):
    """The field maker of one group: a default, its help, its allowed values (if a fixed set) and
    whether it is internal (set by fedrec itself, e.g. in the settings tune writes: not in --help)."""
    assert name in GROUPS

    def make(default: Any, help: str, choices: tuple | None = None, internal: bool = False) -> Any:
        return field(default=default, metadata={"help": help, "choices": choices, "group": name,
                                                "internal": internal})
    return make


_data, _synthetic, _model, _training = _group("Data"), _group("Synthetic data"), _group("Model"), _group("Training")
_privacy, _reliability, _engine, _output = _group("Privacy"), _group("Reliability"), _group("Engine"), _group("Output")


# Choices and defaults of the data, the model and the device belong to fedrec.datasets.names and
# fedrec.models.defaults and are read from there; those below are the run's own (the server's).
SAMPLING_CHOICES = ("fixed", "poisson")
DP_CHOICES = ("none", "central", "local", "distributed")
SECURE_AGGREGATION = ("none", "secagg+")
ACCOUNTANTS = ("rdp", "pld")
ROBUST_CHOICES = ("none", "norm-bound")
_HYPER, _DEVICE, _SYNTHETIC = Hyper(), DevicePolicy(), SyntheticSpec()


def _reg_help(what: str, name: str) -> str:
    ratings, implicit = DEFAULT_REG[name]
    return f"L2 on {what}, per rating; -1: {ratings} (ratings) or {implicit} (implicit)."


@dataclass(frozen=True)
class RunConfig:
    # --- data
    dataset: str = _data("synthetic", "Data set: synthetic (embedded, no download) or a MovieLens name.", DATASETS)
    data_dir: str = _data("", "Data root holding <name>/ folders; empty: $FEDREC_DATA_DIR, else ~/.cache/fedrec.")
    split: str = _data(DEFAULT_SPLIT, "random (per-user holdout), loo (leave-one-out, implicit), or u1..u5 (ml-100k).",
                       SPLITS)
    test_fraction: float = _data(TEST_FRACTION, "Share of each user's ratings held out by the random split.")
    negatives: int = _data(TEST_NEGATIVES, "Sampled negatives per test positive for leave-one-out evaluation.")
    validation: bool = _data(False, "Score on a validation split cut from the training rows alone (per user: "
                                    "--test-fraction of them; --split loo: the latest one) instead of the test set, "
                                    "whose rows are then never used; what `fedrec tune` does.")
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
    # --- model
    model: str = _model("auto", "auto: bpmf for ratings where every user takes part each round, without clipping, "
                                "DP, SecAgg+ or decoys (bpmf won on validation; its statistics need a clipping norm of "
                                "their own, so auto keeps mf wherever one is set), mf otherwise; mf: biased matrix "
                                "factorization; svdpp: adds implicit factors y_j of the items a user rated (SVD++; y_j "
                                "travel like q_i, the rated set stays on the device); bpmf: Bayesian MF by Gibbs "
                                "sampling, one sweep per round (ratings only; devices send per-item sufficient "
                                "statistics, which hold the user's vector and ratings: plain runs only, see README).",
                        ("auto", *MODELS))
    dim: int = _model(-1, f"Embedding size K of users and items; -1: {BPMF_DIM} for bpmf, {_HYPER.dim} otherwise "
                          "(chosen on validation).")
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
                                          "model that is evaluated and saved.")
    # --- training
    lr: float = _training(_HYPER.lr, "Client learning rate: Adam on the user's own vector, SGD on its item copies.")
    server_lr: float = _training(DEFAULT_SERVER_LR, "Server learning rate of the strategy's optimizer (1.0 with "
                                 "fedavg is plain FedAvg).")
    strategy: str = _training(DEFAULT_SERVER_OPTIMIZER, "Server optimizer on the averaged item update.",
                              SERVER_OPTIMIZERS)
    epochs: int = _training(60, "Central baseline: full-batch epochs.")
    rounds: int = _training(60, "Federated rounds.")
    local_epochs: int = _training(_HYPER.local_epochs, "Full-batch passes each sampled user makes over its own "
                                  "ratings per round.")
    users_per_round: int = _training(0, "Users sampled per round (expected number under poisson); 0: all users.")
    sampling: str = _training("fixed", "fixed: that many users without replacement; poisson: each user independently.",
                              SAMPLING_CHOICES)
    users_per_node: int = _training(0, "Simulation: users hosted by one SuperNode (1 = deployment shape); 0: auto.")
    eval_every: int = _training(10, "Evaluate every this many rounds (and after the last).")
    top_k: int = _training(DEFAULT_TOP_K, "K of HR@K, NDCG@K and Recall@K.")
    # --- privacy
    dp: str = _privacy("none", "none; central (per-user clipping, server noise); local (noise added on the device); "
                               "distributed (each device adds a share of the noise; needs secagg+).", DP_CHOICES)
    noise_multiplier: float = _privacy(0.0, "z: noise std is z times the clipping norm (per release); 0 with "
                                            "--target-epsilon: calibrated.")
    clipping_norm: float = _privacy(_DEVICE.clip_norm, "C: each user's item-side update is clipped to this L2 norm "
                                                       "(0: no clipping).")
    target_epsilon: float = _privacy(0.0, "Privacy budget: calibrates z for the rounds given, or stops before a round "
                                          "would exceed it.")
    target_delta: float = _privacy(1e-5, "delta at which epsilon is reported.")
    accountant: str = _privacy("rdp", "rdp or pld (both dp-accounting; PLD is usually tighter).", ACCOUNTANTS)
    update_mode: str = _privacy(_DEVICE.update_mode, "What a client uploads: dense (all rows), sparse (rated rows), "
                                                     "padded (rated + decoy rows).", UPDATE_MODES)
    pad_ratio: float = _privacy(_DEVICE.pad_ratio, "padded mode: decoy rows per rated row.")
    max_rounds_per_user: int = _privacy(_DEVICE.max_rounds, "Local and distributed DP: rounds a user may take part in "
                                        "(its device enforces it; epsilon against the server is for this many); 0: "
                                        "auto, a cap that about 1 in 100 runs would reach.")
    secure_aggregation: str = _privacy("none", "secagg+: the server learns only the sum of the nodes' updates "
                                       "(Flower's SecAgg+); uploads are dense.", SECURE_AGGREGATION)
    secagg_shares: float = _privacy(0.0, "SecAgg+: neighbours each node shares its keys with; 0: auto, 2 log2(nodes) "
                                    "+ 1 (Bell et al.'s logarithmic degree); below 1 a share of the round's nodes; "
                                    "from 3 a count (odd).")
    secagg_threshold: float = _privacy(0.67, "SecAgg+: shares needed to rebuild a key; up to 1 a share of "
                                       "--secagg-shares, from 2 a count. Colluding neighbours below it learn nothing.")
    secagg_min_fraction: float = _privacy(0.8, "SecAgg+: least share of a round's sampled users that must arrive for "
                                          "the sum to be unmasked; distributed DP sizes each device's noise share for "
                                          "it.")
    secagg_timeout: float = _privacy(0.0, "SecAgg+: seconds to wait for each stage's replies (0: no limit); late nodes "
                                          "count as dropped and their masks are recovered.")
    reproducible_noise: bool = _privacy(False, "Derive DP noise, decoys, DP sampling and the devices' starting "
                                        "vectors and training negatives from --seed: repeatable, and NOT private "
                                        "(anyone with the seed can regenerate them).")
    # --- reliability
    round_timeout: float = _reliability(0.0, "Seconds the server waits for a round's replies; later replies count as "
                                        "failed (0: until every node answered or failed, at most an hour).")
    min_reply_fraction: float = _reliability(0.5, "Least share of a round's sampled users whose updates must arrive "
                                             "and pass the checks for the round to be applied; otherwise the round is "
                                             "skipped.")
    dropout: float = _reliability(0.0, "Simulation: probability that each sampled device fails in a round, to measure "
                                       "robustness.")
    robust_aggregation: str = _reliability("norm-bound", "none, or norm-bound: a reply whose norm exceeds "
                                           "--robust-bound times the round's median per-user update norm per user it "
                                           "sums is dropped (not under DP, where replies above users x C are rejected "
                                           "instead).", ROBUST_CHOICES)
    robust_bound: float = _reliability(10.0, "norm-bound: allowed multiple of the round's median per-user update norm.")
    checkpoint_every: int = _reliability(10, "Write a checkpoint to the run directory every this many rounds (and on "
                                             "Ctrl-C/SIGTERM); 0: only on an interrupt.")
    keep_checkpoints: bool = _reliability(False, "Keep the server's checkpoint of round 0, of every "
                                          "--checkpoint-every round and of the last round in RUN_DIR.checkpoints/, "
                                          "and the devices' state at those rounds in RUN_DIR.devices/ (both beside "
                                          "the run directory, never released): what `fedrec forget` replays from.")
    resume: str = _reliability("", "Run directory of an interrupted run to continue from its last checkpoint, with "
                               "the run's own saved settings (so nothing else may be passed with it).")
    # --- engine
    ray_address: str = _engine("", "Simulation: a running Ray cluster to join (the address `ray start --head` prints, "
                                   "e.g. 10.0.0.5:6379) instead of starting Ray on this machine; each ClientApp actor "
                                   "takes one of the cluster's CPUs.")
    # --- output
    out: str = _output("", "Run directory for results; empty: runs/<mode>-<time>.")

    # ------------------------------------------------------------------
    @property
    def implicit(self) -> bool:
        return self.split == "loo"

    @property
    def guards_uploads(self) -> bool:
        """Does the run claim anything against the server (DP, SecAgg+ or decoys)?"""
        return self.dp != "none" or self.secure_aggregation != "none" or self.update_mode == "padded"

    @property
    def private_device_randomness(self) -> bool:
        """Starting vectors and training negatives from OS entropy on the device: wherever the run
        claims anything against the server, unless the user asked for reproducible (non-private) noise."""
        return self.guards_uploads and not self.reproducible_noise

    def resolved(self) -> "RunConfig":
        """Fill the loss-dependent defaults (-1) with concrete values."""
        model = self.auto_model() if self.model == "auto" else self.model
        defaults = {k: v[self.implicit] for k, v in DEFAULT_REG.items()} if model != "bpmf" else BPMF_REG
        changes = {k: v for k, v in defaults.items() if getattr(self, k) < 0}
        dim = self.dim if self.dim > 0 else (BPMF_DIM if model == "bpmf" else _HYPER.dim)
        return dataclasses.replace(self, model=model, dim=dim, **changes)

    def auto_model(self) -> str:
        """What --model auto runs: BPMF where its refusals and its clipping scale do not get in the way."""
        return "mf" if self._mf_because() else "bpmf"

    def _mf_because(self) -> str:
        """Why --model auto runs MF here ('' where it runs BPMF)."""
        # a clipping norm sized for MF's updates would crush BPMF's statistics (norm ~ alpha sqrt(ratings))
        reasons = [("implicit feedback (--split loo)", self.implicit),
                   (f"--dp {self.dp}", self.dp != "none"),
                   ("--secure-aggregation", self.secure_aggregation != "none"),
                   ("decoys (--update-mode padded)", self.update_mode == "padded"),
                   ("--clipping-norm", self.clipping_norm != 0),
                   ("partial participation (--users-per-round, --sampling poisson)",
                    self.users_per_round != 0 or self.sampling != "fixed")]
        return ", ".join(why for why, holds in reasons if holds)

    def model_reason(self) -> str:
        """Which model the run trains and why (the table, summary.json, comparison.md). True whether the
        model came from --model auto or by name, so it can be said of a resolved config too."""
        auto = self.auto_model()
        model = auto if self.model == "auto" else self.model
        if model != auto:
            return f"{model}, chosen with --model (--model auto would run {auto} here)"
        because = self._mf_because()
        return (f"mf, what --model auto runs with {because} (bpmf only for ratings with every user in every "
                "round and no privacy option)" if because else
                "bpmf, what --model auto runs for ratings with every user in every round and no privacy option "
                "(it won on validation)")

    def validate(self) -> "RunConfig":
        self.check_values()
        return self._check_settings()

    def check_values(self) -> None:
        """Each value on its own: its type, finite, one of its choices."""
        for f in fields(self):
            value = getattr(self, f.name)
            if not _is_kind(value, type(f.default)):  # e.g. RunConfig(rounds=True): a bool is not a count
                raise ConfigError(f"{_kebab(f.name)}={value!r} is not a valid {type(f.default).__name__}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{_kebab(f.name)} must be a finite number (got {value})")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"{_kebab(f.name)}={value!r} is not valid; choose one of {', '.join(choices)}")

    def _check_settings(self) -> "RunConfig":
        positive = ("lr", "server_lr", "epochs", "rounds", "local_epochs", "eval_every", "top_k", "negatives",
                    "synthetic_users", "synthetic_items", "synthetic_rank", "train_negatives", "robust_bound",
                    "recency_items", "bpmf_alpha")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_kebab(name)} must be > 0 (got {getattr(self, name)})")
        non_negative = ("users_per_round", "users_per_node", "synthetic_noise", "init_std", "noise_multiplier",
                        "clipping_norm", "target_epsilon", "pad_ratio", "max_rounds_per_user", "round_timeout",
                        "checkpoint_every", "secagg_timeout", "recency_weight", "burn_in")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{_kebab(name)} must be >= 0 (got {getattr(self, name)})")
        for name, most in LIMITS.items():
            if getattr(self, name) > most:
                raise ConfigError(f"{_kebab(name)} must be at most {most:,} (got {getattr(self, name):,}); "
                                  "a larger value would exhaust memory or time long before it helps")
        for name in ("reg_user", "reg_item", "reg_bias", "dim"):
            if getattr(self, name) < 0 and getattr(self, name) != -1:
                raise ConfigError(f"{_kebab(name)} must be >= 0, or -1 for the default (got {getattr(self, name)})")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be between 0 and 2**63 - 1 (got {self.seed})")
        if not 0 <= self.recency_decay <= 1:
            raise ConfigError(f"recency-decay must be in [0, 1] (got {self.recency_decay})")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test-fraction must be between 0 and 1 (got {self.test_fraction})")
        if not 0 < self.synthetic_density <= 1:
            raise ConfigError(f"synthetic-density must be in (0, 1] (got {self.synthetic_density})")
        if not 0 <= self.min_reply_fraction <= 1:
            raise ConfigError(f"min-reply-fraction must be in [0, 1] (got {self.min_reply_fraction})")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1) (got {self.dropout}); at 1 no device would ever reply")
        if self.dp == "none" and self.noise_multiplier > 0:
            raise ConfigError("noise-multiplier is set but dp is 'none'; pass --dp central or --dp local")
        if not 0 < self.target_delta < 1:
            raise ConfigError(f"target-delta must be in (0, 1) (got {self.target_delta})")
        if self.dp != "none":
            if self.clipping_norm <= 0:
                raise ConfigError(f"--dp {self.dp} needs --clipping-norm > 0 (got {self.clipping_norm})")
            if self.noise_multiplier <= 0 and self.target_epsilon <= 0:
                raise ConfigError(f"--dp {self.dp} needs --noise-multiplier > 0 or --target-epsilon > 0; "
                                  "use --dp none for a non-private run")
        if self.model == "bpmf":
            if self.implicit:
                raise ConfigError("--model bpmf models ratings; for --split loo use --model mf or svdpp")
            if self.update_mode == "padded":
                raise ConfigError("--model bpmf has no decoys (a decoy's statistics would need a made-up vector and "
                                  "rating); use --update-mode dense or sparse")
            if self.dp != "none":
                raise ConfigError("--model bpmf with --dp: its Gibbs chain does not hold up to DP noise at a useful "
                                  "epsilon yet (README); use --model mf for DP runs")
            if self.secure_aggregation != "none":
                raise ConfigError("--model bpmf with --secure-aggregation: the per-item sums of g g^T have the rank "
                                  "of the item's rater count, and the server reads users off them (README); use "
                                  "--model mf")
            if self.users_per_round or self.sampling != "fixed":
                raise ConfigError("--model bpmf draws each item from all its raters' statistics every round; use "
                                  "--users-per-round 0 (every user) and --sampling fixed")
        if self.model == "svdpp" and self.update_mode == "padded":
            raise ConfigError("--model svdpp with --update-mode padded would not hide the decoys: SVD++'s y step is "
                              "shared by a user's rows and built from its real ones; use dense or sparse (with "
                              "--secure-aggregation or --dp to hide the rated set)")
        if self.dp == "local" and self.update_mode != "dense":
            raise ConfigError(f"--dp local with --update-mode {self.update_mode} would claim a guarantee it does not "
                              "give (the row indices are not noised); use --update-mode dense")
        if self.dp == "central" and self.accountant == "pld" and self.sampling == "fixed":
            raise ConfigError("--accountant pld does not support fixed-size sampling (replace-one); "
                              "use --sampling poisson or --accountant rdp")
        if self.dp == "distributed" and self.secure_aggregation == "none":
            raise ConfigError("--dp distributed needs --secure-aggregation secagg+ (otherwise the server sees each "
                              "device's small noise share); use --dp central or --dp local without it")
        if self.secure_aggregation != "none":
            if self.update_mode != "dense":
                raise ConfigError(f"--secure-aggregation {self.secure_aggregation} sums dense uploads "
                                  f"(a sparse row set would itself leak); use --update-mode dense")
            if self.clipping_norm <= 0:
                raise ConfigError("--secure-aggregation needs --clipping-norm > 0: SecAgg+ quantizes within a "
                                  "range that the clipping bound sets")
            if not (0 <= self.secagg_shares < 1 or (self.secagg_shares >= 3 and self.secagg_shares.is_integer())):
                raise ConfigError(f"secagg-shares must be 0 (auto), in (0, 1) or a whole number >= 3 "
                                  f"(got {self.secagg_shares})")
            if not (0 < self.secagg_threshold <= 1
                    or (self.secagg_threshold >= 2 and self.secagg_threshold.is_integer())):
                raise ConfigError(f"secagg-threshold must be in (0, 1] or a whole number >= 2 "
                                  f"(got {self.secagg_threshold})")
            if not 0 < self.secagg_min_fraction <= 1:
                raise ConfigError(f"secagg-min-fraction must be in (0, 1] (got {self.secagg_min_fraction})")
        if self.split.startswith("u") and self.dataset != "ml-100k":
            raise ConfigError(f"split {self.split} exists only for ml-100k; use --split random or loo")
        _check_memory(self)
        return self

    # ------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: dict[str, Any], base: "RunConfig | None" = None) -> "RunConfig":
        """Build from kebab- or snake-case keys; unknown keys and wrong types are errors."""
        base = base or cls()
        known = {f.name: f for f in fields(cls)}
        changes = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown setting {key!r}; see README for the list of settings")
            changes[name] = _coerce(key, value, type(getattr(base, name)))
        return dataclasses.replace(base, **changes)

    @classmethod
    def from_toml(cls, path: str | Path, base: "RunConfig | None" = None) -> "RunConfig":
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"cannot read config file {path}: {error}") from None
        # flat (what fedrec writes, and flwr run --run-config reads), or an older run's [tool.flwr.app.config]
        table = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data)
        return cls.from_mapping(table, base)

    def to_dict(self, kebab: bool = True) -> dict[str, Any]:
        return {(_kebab(f.name) if kebab else f.name): getattr(self, f.name) for f in fields(self)}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _is_kind(value: Any, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):
        return isinstance(value, bool) and kind is bool
    if kind is int:
        return isinstance(value, numbers.Integral)
    return isinstance(value, numbers.Real if kind is float else kind)


def _coerce(key: str, value: Any, kind: type) -> Any:
    """A TOML or flag value as the field's type; never a bool as a number, nor a number as a bool."""
    bad = ConfigError(f"{key}={value!r} is not a valid {kind.__name__}")
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        if kind is bool:
            if text not in ("true", "false"):
                raise bad
            return text == "true"
        try:
            value = int(text) if kind is int else float(text)
        except ValueError:
            raise bad from None
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # 1e3 in a TOML file is a whole number
    if not _is_kind(value, kind):
        raise bad
    try:
        return kind(value)
    except OverflowError:  # an int too large for a float
        raise bad from None


# Upper bounds no real run reaches; beyond them the run would exhaust memory (or time) before failing.
LIMITS = {"dim": 8192, "synthetic_users": 100_000_000, "synthetic_items": 10_000_000, "synthetic_rank": 1024,
          "negatives": 100_000, "train_negatives": 1000, "top_k": 100_000, "pad_ratio": 1000.0,
          "recency_items": 10_000}


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(cfg: RunConfig) -> None:
    """Refuse a run whose data and model alone (a floor: training needs more) exceed this machine's memory."""
    if cfg.dataset == "synthetic":
        users, items = cfg.synthetic_users, cfg.synthetic_items
        ratings = min(users * items, max(users * items * cfg.synthetic_density, 5 * users))
        data, lower = ratings * 40 + (users + items) * cfg.synthetic_rank * 12, \
            "--synthetic-users, --synthetic-items or --synthetic-density"
        what = f"synthetic data of {users:,} users x {items:,} items"
    else:
        users, items, ratings = KNOWN_SIZES[cfg.dataset]
        data, lower, what = ratings * 40, "nothing: use a smaller data set", cfg.dataset
    needs = {lower: data, "--dim": (users + items) * cfg.resolved().dim * 4 * 2,
             "--negatives": users * cfg.negatives * 8 if cfg.implicit else 0}
    total, memory = sum(needs.values()), _physical_memory()
    if memory and total > memory:
        largest = max(needs, key=needs.get)
        raise ConfigError(f"{what} with these settings needs at least {total / 2**30:,.1f} GB of memory and "
                          f"this machine has {memory / 2**30:.1f} GB; lower {largest}")


# What each kind of run reads: a setting outside it would be silently ignored, so it is refused (flags)
# or reset (config files, whose other settings still apply).
DATA_SETTINGS = frozenset({"dataset", "data_dir", "split", "test_fraction", "negatives", "validation", "tuned",
                           "synthetic_users", "synthetic_items", "synthetic_density", "synthetic_rank",
                           "synthetic_noise", "seed"})
CENTRAL_SETTINGS = DATA_SETTINGS | {"model", "dim", "reg_user", "reg_item", "reg_bias", "init_std", "train_negatives",
                                    "bpmf_alpha", "burn_in",
                                    "recency_items", "recency_decay", "recency_weight",
                                    "lr", "server_lr", "strategy", "epochs", "eval_every", "top_k", "out"}


def moot_settings(cfg: RunConfig) -> dict[str, tuple[str, bool]]:
    """Per setting that another one can make moot: (that switch, whether it does in `cfg`)."""
    no_dp, pad, loo = cfg.dp == "none", cfg.update_mode == "padded", cfg.split == "loo"
    bpmf = cfg.resolved().model == "bpmf"
    moot = {"noise_multiplier": ("dp", no_dp), "target_epsilon": ("dp", no_dp), "target_delta": ("dp", no_dp),
            "accountant": ("dp", no_dp), "max_rounds_per_user": ("dp", cfg.dp not in ("local", "distributed")),
            "reproducible_noise": ("dp", not cfg.guards_uploads),  # nothing private left to repeat
            "pad_ratio": ("update_mode", not pad),
            "robust_bound": ("robust_aggregation", cfg.robust_aggregation == "none"),
            "test_fraction": ("split", cfg.split != "random" and (loo or not cfg.validation)),  # validation: its share
            "negatives": ("split", not loo),
            "train_negatives": ("split", not loo), "data_dir": ("dataset", cfg.dataset == "synthetic"),
            **{name: ("split", not loo) for name in ("recency_items", "recency_decay", "recency_weight")},
            **{name: ("model", not bpmf) for name in ("bpmf_alpha", "burn_in")},
            **{name: ("model", bpmf) for name in ("lr", "server_lr", "strategy", "local_epochs",
                                                                 "reg_item")}}
    for f in fields(cfg):
        if f.name.startswith("secagg_"):
            moot[f.name] = ("secure_aggregation", cfg.secure_aggregation == "none")
        if f.name.startswith("synthetic_"):
            moot[f.name] = ("dataset", cfg.dataset != "synthetic")
    return moot


def applies(cfg: RunConfig, name: str) -> bool:
    """Does setting `name` act in a run with `cfg` (no other setting makes it moot)?"""
    return not moot_settings(cfg).get(name, ("", False))[1]


def ignored_settings(cfg: RunConfig, reads: frozenset | None = None) -> dict[str, str]:
    """Settings changed from their default that a run would not use, each with why: "outside" the
    settings its command reads (`reads`; None: all), or "with --<switch> <value>" that makes it moot."""
    moot = moot_settings(cfg)
    default, out = RunConfig(), {}
    for f in fields(cfg):
        if getattr(cfg, f.name) == getattr(default, f.name):
            continue
        switch, is_moot = moot.get(f.name, ("", False))
        if reads is not None and f.name not in reads:
            out[f.name] = "outside"
        elif is_moot and switch == "model":
            model = cfg.resolved().model
            auto = " (what --model auto runs here)" if cfg.model == "auto" else ""
            out[f.name] = f"with --model {model}{auto}; pass --model {'mf' if model == 'bpmf' else 'bpmf'} to use it"
        elif is_moot:
            out[f.name] = f"with --{_kebab(switch)} {getattr(cfg, switch)}"
    return out


def with_defaults(cfg: RunConfig, names: list[str]) -> RunConfig:
    return dataclasses.replace(cfg, **{n: getattr(RunConfig(), n) for n in names})
