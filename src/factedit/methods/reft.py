"""LoReFT: low-rank linear subspace representation fine-tuning (Wu et al., 2024), used as an editor.

Φ(h) = h + Rᵀ(W h + b − R h), R ∈ R^{r×d} with orthonormal rows, W ∈ R^{r×d}, b ∈ R^r
(specs/representation.md). Applied to the block output at chosen layers and prompt positions of the
frozen model, trained on the requests' teacher-forced target NLL. The patch is a module patch: the
model's weights never change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..config import NonNegFloat, PosFloat, PosInt
from ..lm.arch import Site
from ..lm.batch import request_batches, target_nll
from ..lm.load import LM
from ..patch.modules import ModulePatch, Placement, register_intervention
from ..types import EditRequest
from .base import Editor
from .train import TrainSettings, train_loop

log = logging.getLogger(__name__)


@register_intervention("loreft")
class LoReFTIntervention(nn.Module):
    """Inference form of Φ with R materialised (no parametrisation cost per forward)."""

    def __init__(self, d: int, rank: int) -> None:
        super().__init__()
        self.d, self.rank = d, rank
        self.R = nn.Parameter(torch.zeros(rank, d))  # (r, d), orthonormal rows
        self.W = nn.Parameter(torch.zeros(rank, d))  # (r, d)
        self.b = nn.Parameter(torch.zeros(rank))  # (r,)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: (..., d); (W h + b − R h): (..., r); back to (..., d) through Rᵀ
        return h + (h @ self.W.T + self.b - h @ self.R.T) @ self.R

    def spec(self) -> dict:
        return {"d": self.d, "rank": self.rank}

    @classmethod
    def from_spec(cls, spec: dict) -> LoReFTIntervention:
        return cls(int(spec["d"]), int(spec["rank"]))


class _TrainableLoReFT(nn.Module):
    """Training form: R kept orthonormal by torch's orthogonal parametrisation."""

    def __init__(self, d: int, rank: int) -> None:
        super().__init__()
        self.rotate = nn.utils.parametrizations.orthogonal(nn.Linear(d, rank, bias=False))  # weight (r, d)
        self.source = nn.Linear(d, rank)  # W, b

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        R = self.rotate.weight  # (r, d)
        return h + (self.source(h) - h @ R.T) @ R

    def export(self) -> LoReFTIntervention:
        d, r = self.source.in_features, self.source.out_features
        out = LoReFTIntervention(d, r)
        with torch.no_grad():
            out.R.copy_(self.rotate.weight)
            out.W.copy_(self.source.weight)
            out.b.copy_(self.source.bias)
        return out


@dataclass(frozen=True)
class LoReFTConfig:
    layers: tuple[int, ...] = (8,)  # blocks whose output is intervened on
    rank: PosInt = 4  # r, the subspace dimension
    positions: Literal["last", "first_last", "all", "every"] = "last"  # prompt positions (every: decoding too)
    lr: PosFloat = 4e-3  # AdamW learning rate
    steps: PosInt = 100  # passes over the requests
    batch_size: PosInt = 64
    weight_decay: NonNegFloat = 0.0
    early_stop_loss: NonNegFloat = 1e-2
    seed: int = 0  # initialisation of R, W, b


class LoReFTEditor(Editor):
    name = "loreft"
    Config = LoReFTConfig

    def _build(self, d: int) -> list[nn.Module]:
        return [_TrainableLoReFT(d, self.config.rank) for _ in self.config.layers]

    def _compute(self, lm: LM, requests: list[EditRequest]) -> ModulePatch:
        c = self.config
        sites = [Placement(Site("block_output", int(layer)), positions=c.positions) for layer in c.layers]
        gen = torch.random.fork_rng(devices=[])
        with gen:
            torch.manual_seed(c.seed)
            train_mods = self._build(lm.hidden_size)
        train_patch = ModulePatch(method=self.name, config={}, base_fingerprint=lm.fingerprint, placements=sites,
                                  modules=train_mods)
        params = [p for m in train_mods for p in m.parameters()]
        batches, sizes = request_batches(lm, requests, c.batch_size)
        settings = TrainSettings(steps=c.steps, lr=c.lr, optimizer="adamw", weight_decay=c.weight_decay,
                                 early_stop_loss=c.early_stop_loss, desc=self.name)
        with train_patch.apply(lm):
            for m in train_mods:
                m.train()
            res = train_loop(params, batches, lambda b: target_nll(lm, b).mean() + self._extra_loss(lm, b), settings,
                             weights=sizes)
        mean = res.loss
        log.info("%s: layers %s rank %d, final loss %.3f", self.name, list(c.layers), c.rank, mean)
        modules = [m.export() for m in train_mods]
        return ModulePatch(method=self.name, config=self.config_dict(), base_fingerprint=lm.fingerprint,
                           requests=list(requests), meta={"preset": self.preset, "final_loss": mean},
                           placements=sites, modules=modules)

    def _extra_loss(self, lm: LM, batch) -> torch.Tensor | float:
        """Hook for subclasses (BaFT adds locality and load-balancing terms)."""
        return 0.0
