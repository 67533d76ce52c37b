"""AlphaEdit (specs/locate.md §3): MEMIT with its update projected onto the null space of the preserved keys."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from ...config import NonNegFloat
from ...errors import FactEditError
from ...lm.load import LM
from ...stats import null_projector
from .base import LocateConfig
from .memit import MEMITEditor
from .solvers import solve

log = logging.getLogger(__name__)


# ---- AlphaEdit ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AlphaEditConfig(LocateConfig):
    nullspace_threshold: NonNegFloat = 2e-2
    nullspace_mode: Literal["absolute", "relative"] = "absolute"  # "absolute": eigenvalue < threshold (published); "relative": < threshold·λ_max
    L2: NonNegFloat = 10.0  # the identity coefficient (official repo 10; EasyEdit yamls 1)


class AlphaEditEditor(MEMITEditor):
    name = "alphaedit"
    Config = AlphaEditConfig

    def projector(self, lm: LM, layer: int) -> tuple[torch.Tensor, dict]:
        c = self.config
        return null_projector(self.stats(lm, [layer])[layer], c.nullspace_threshold, c.nullspace_mode)

    def _layer_update(self, lm, layer, K, R):
        P, info = self.projector(lm, layer)
        if info["kept"] == 0:
            raise FactEditError(f"alphaedit layer {layer}: the null space at threshold {self.config.nullspace_threshold} "
                                f"({self.config.nullspace_mode}) is empty; raise nullspace_threshold")
        P = P.double()
        Kd = K.double().T
        d0 = P.shape[0]
        A = P @ (Kd @ Kd.T + self._cp(layer, d0)) + self.config.L2 * torch.eye(d0, dtype=torch.float64)
        Y = solve(A, P @ Kd, f"alphaedit layer {layer}")
        return R.double().T, Y
