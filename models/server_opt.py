"""Server-side optimizers for the shared item parameters (Reddi et al., 2021).

The averaged client change is a pseudo-gradient; torch.optim applies it. With SGD at lr 1
this is FedAvg; SGD with momentum is FedAvgM; Adam is FedAdam; Adagrad is FedAdagrad.

Why the adaptive ones are the default for MF: an item's averaged change is the sum of its
raters' changes over all sampled users, so rows of rarely rated items move orders of
magnitude less than popular ones, while each user's own vector moves at full speed. Adam
scales every coordinate by its own history, so a rarely rated row steps as far as a
popular one, and needs no per-item rater counts, which would reveal who rated what.
"""

from __future__ import annotations

import torch

from .defaults import SERVER_OPTIMIZERS
from .mf import ItemParams


class ServerOptimizer:
    def __init__(self, items: ItemParams, name: str, lr: float, momentum: float = 0.9):
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(SERVER_OPTIMIZERS)}")
        self.items = items
        params = list(items.tensors().values())
        if name == "fedadam":
            self.opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
        elif name == "fedadagrad":
            self.opt = torch.optim.Adagrad(params, lr=lr, eps=1e-8)
        else:
            self.opt = torch.optim.SGD(params, lr=lr, momentum=momentum if name == "fedavgm" else 0.0)

    def step(self, mean_delta: dict[str, torch.Tensor]) -> None:
        """Move the items along the mean client change (its negative is the gradient)."""
        for name, tensor in self.items.tensors().items():
            tensor.grad = -mean_delta[name].to(tensor.dtype)
        self.opt.step()
