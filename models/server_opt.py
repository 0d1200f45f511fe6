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

import numpy as np
import torch

from .defaults import DEFAULT_SERVER_LR, DEFAULT_SERVER_OPTIMIZER, SERVER_OPTIMIZERS  # noqa: F401 (re-exported)


class ServerOptimizer:
    def __init__(self, params: dict[str, torch.Tensor], name: str, lr: float, momentum: float = 0.9):
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(SERVER_OPTIMIZERS)}")
        self.params = params
        tensors = list(params.values())
        if name == "fedadam":
            self.opt = torch.optim.Adam(tensors, lr=lr, betas=(0.9, 0.999), eps=1e-8)
        elif name == "fedadagrad":
            self.opt = torch.optim.Adagrad(tensors, lr=lr, eps=1e-8)
        else:
            self.opt = torch.optim.SGD(tensors, lr=lr, momentum=momentum if name == "fedavgm" else 0.0)

    def step(self, mean_delta: dict[str, torch.Tensor]) -> None:
        """Move the parameters along the mean client change (its negative is the gradient)."""
        for name, tensor in self.params.items():
            tensor.grad = -mean_delta[name].to(tensor.dtype).reshape(tensor.shape)
        self.opt.step()

    def arrays(self) -> dict[str, np.ndarray]:
        """The optimizer's state as named arrays (no pickle): 'p<param>.<name>'."""
        out = {}
        for index, state in self.opt.state_dict()["state"].items():
            for name, value in state.items():
                out[f"p{index}.{name}"] = torch.as_tensor(value).numpy().copy()  # not a view of live state
        return out

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        state_dict = self.opt.state_dict()
        state: dict[int, dict] = {}
        for key, value in arrays.items():
            index, name = key[1:].split(".", 1)
            state.setdefault(int(index), {})[name] = torch.as_tensor(value)
        state_dict["state"] = state
        self.opt.load_state_dict(state_dict)
