"""The moving average of the weights that a recipe's `ema_decay` keeps."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak and Juditsky 1992; kept by DeiT
    and timm's `ModelEma`), updated after every optimiser step:

        average <- decay * average + (1 - decay) * weights     (the first update copies)

    `module` is a copy of the model holding the average, so it validates and saves as a model does.
    One multi-tensor kernel per update and a Python counter: unlike `torch.optim.swa_utils.
    AveragedModel`, whose counter is a tensor copied to the device every step, it never makes
    the host wait for a GPU."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0
        mine, theirs = self.module, model
        self._mine = [t for t in itertools.chain(mine.parameters(), mine.buffers()) if t.is_floating_point()]
        self._theirs = [t for t in itertools.chain(theirs.parameters(), theirs.buffers()) if t.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        if self.updates == 0:
            torch._foreach_copy_(self._mine, self._theirs)
        else:
            torch._foreach_lerp_(self._mine, self._theirs, 1.0 - self.decay)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
