"""What the run config reads from the model layer: the models, update modes and server
optimizers to choose from, and the default hyper-parameters of the model and the device.

Plain Python (no torch), so that the run config, and the command line built from it, load in
a fraction of a second; the model code imports these from here.
"""

from __future__ import annotations

from dataclasses import dataclass

# mf: biased MF; svdpp: adds the implicit factors y_j of the items a user rated (models/svdpp.py);
# bpmf: Bayesian MF by Gibbs sampling (models/bpmf.py); dpstats: private sufficient statistics (models/dpstats.py);
# the published federated recommenders: pfedrec, fedrecon, fcf (models/pfedrec.py, fedrecon.py, fcf.py)
MODELS = ("mf", "svdpp", "bpmf", "dpstats", "pfedrec", "fedrecon", "fcf")

# L2 per rating as (ratings, implicit feedback): the losses differ in scale, so each has its own.
# Chosen by `fedrec tune` on validation splits of ML-100K u1.base / leave-one-out train.
DEFAULT_REG = {"reg_user": (0.1, 0.01), "reg_item": (0.2, 0.001), "reg_bias": (0.01, 0.001)}
# BPMF reads reg_user and reg_bias as the precisions of its fixed user prior (reg_item is unused:
# the items' prior is learned). Chosen on ML-100K u1 (prototype: 10 / 1 gave 0.9069, 5 / 1 0.9078).
BPMF_REG = {"reg_user": 10.0, "reg_item": 0.0, "reg_bias": 1.0}
BPMF_DIM = 10  # K of BPMF (u1 validation, 60 sweeps: 0.9093 at K=10, 0.9085 at 20, 0.9090 at 32 and 5x the work)


@dataclass(frozen=True)
class Hyper:
    """Model and local-training hyper-parameters (built from the run config, whose defaults are these)."""

    model: str = "mf"
    dim: int = 32
    reg_user: float = DEFAULT_REG["reg_user"][0]  # L2 on p_u per rating of the user
    reg_item: float = DEFAULT_REG["reg_item"][0]  # L2 on q_i per rating of the item
    reg_bias: float = DEFAULT_REG["reg_bias"][0]  # L2 on b_u and b_i per rating
    lr: float = 0.05  # Adam step of user parameters; SGD step of local item copies
    local_epochs: int = 1
    implicit: bool = False  # BCE on positives + sampled negatives instead of MSE on ratings
    train_negatives: int = 1  # sampled negatives per positive (implicit only)
    init_std: float = 0.1
    seed: int = 0
    # Implicit feedback: re-scoring with the user's latest items where its device ranks (models/recency.py)
    recency_items: int = 5
    recency_decay: float = 0.7
    recency_weight: float = 16.0  # 0: off
    bpmf_alpha: float = 1.5  # BPMF: precision of the rating noise
    burn_in: int = 20  # BPMF: rounds whose samples are not averaged into the model
    epsilon: float = 0.0  # the run's target epsilon (0: not private, or z by hand): public, for defaults ruled by it
    local_batch: int = 0  # rows per local SGD step (PFedRec); 0: one full-batch step per local epoch
    item_lr_scale: float = 80.0  # PFedRec: item step = lr x items x this (its code's lr_eta)
    recon_fraction: float = 0.5  # FedRecon: share of a user's rows that reconstruct its vector each round
    heldout_not_negative: bool = False  # leave-one-out: training negatives skip held-out items (a leak, see config)
    confidence: float = 1.0  # FCF: an interaction's confidence is 1 + this (Hu et al.'s alpha)


SERVER_OPTIMIZERS = ("fedadam", "fedavg", "fedavgm", "fedadagrad")  # models/server_opt.py
DEFAULT_SERVER_OPTIMIZER = "fedadam"
DEFAULT_SERVER_LR = 0.05
DEFAULT_TOP_K = 10  # K of HR@K, NDCG@K and Recall@K
MODEL_FILE = "model.npz"  # a run's saved model (models/saved.py); named here so that finding a run loads no torch
