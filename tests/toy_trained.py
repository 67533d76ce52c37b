"""A small trained editor for the tests of the trained-editor machinery (not a method of the library).

It learns, on training facts, a map ``net`` from the block output at a prompt's last token to a shift of that
state (a "hyper-network" in miniature). Its patches mount the trained map on the edited prompts' last tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from factedit.config import PosFloat, PosInt
from factedit.lm.arch import Site
from factedit.lm.batch import request_batches, target_nll
from factedit.methods.train import TrainSettings, train_loop
from factedit.methods.trained import TrainedEditor
from factedit.patch.modules import ModulePatch, Placement, register_intervention


@register_intervention("toy-shift")
class Shift(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d
        self.net = nn.Linear(d, d)
        nn.init.zeros_(self.net.weight)
        nn.init.zeros_(self.net.bias)

    def forward(self, h):
        return h + self.net(h)

    def spec(self) -> dict:
        return {"d": self.d}

    @classmethod
    def from_spec(cls, spec: dict) -> Shift:
        return cls(int(spec["d"]))


@dataclass(frozen=True)
class ToyConfig:
    layer: int = 2
    steps: PosInt = 12
    lr: PosFloat = 0.05
    batch_size: PosInt = 2


class ToyEditor(TrainedEditor):
    name = "toy"
    Config = ToyConfig

    def build(self, lm) -> None:
        torch.manual_seed(0)
        self.shift = Shift(lm.hidden_size)

    def modules(self) -> dict[str, nn.Module]:
        return {"shift": self.shift}

    def _placement(self) -> Placement:
        return Placement(Site("block_output", self.config.layer), "last")

    def _fit(self, lm, cases, checkpoint: Path | None, val_cases=None) -> dict:
        c = self.config
        reqs = [r for case in cases for r in case.requests]
        batches, sizes = request_batches(lm, reqs, c.batch_size)
        patch = ModulePatch(method=self.name, config={}, base_fingerprint=lm.fingerprint,
                            placements=[self._placement()], modules=[self.shift])
        with patch.apply(lm):
            res = train_loop(list(self.shift.parameters()), batches, lambda b: target_nll(lm, b).mean(),
                             TrainSettings(steps=c.steps, lr=c.lr, grad_clip=10.0, desc="toy", checkpoint_every=1, log_every=4),
                             weights=sizes, checkpoint=checkpoint, progress=False)
        return {"loss": res.loss, "passes": res.steps}

    def _compute(self, lm, requests):
        import copy

        return ModulePatch(method=self.name, config=self.config_dict(), base_fingerprint=lm.fingerprint,
                           requests=list(requests), placements=[self._placement()], modules=[copy.deepcopy(self.shift)])
