"""FT-L: constrained fine-tuning of one MLP out-projection (the baseline of the ROME paper, §4).

Minimise the teacher-forced NLL of ``target_new`` given each request's prompt over a delta ΔW of one
layer's MLP out-projection, projecting ΔW onto the L∞ ball ‖ΔW‖∞ ≤ ε after every step (ROME's
``norm_constraint``). The model's weight is never touched during training: a forward hook adds
x ΔWᵀ to the module's output, so ``compute`` is pure by construction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import NonNegFloat, PosFloat, PosInt
from ..lm.arch import linear_delta_out
from ..lm.batch import request_batches, target_nll
from ..lm.hooks import Trace
from ..lm.load import LM
from ..patch.weights import Delta, WeightPatch
from ..types import EditRequest
from .base import Editor
from .train import TrainSettings, train_loop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FTConfig:
    layer: int = 5  # block whose MLP out-projection is tuned (ROME's FT-L tunes one layer)
    lr: PosFloat = 5e-4  # Adam learning rate (ROME/EasyEdit FT-L default)
    steps: PosInt = 25  # passes over the requests (ROME: num_steps)
    batch_size: PosInt = 64  # requests per optimiser step
    norm_constraint: PosFloat = 5e-4  # ε of the L∞ constraint on ΔW, in weight units (ROME: 5e-4)
    weight_decay: NonNegFloat = 0.0
    early_stop_loss: NonNegFloat = 1e-2  # stop once the mean target NLL is below this


class FTEditor(Editor):
    name = "ft"
    Config = FTConfig

    def _compute(self, lm: LM, requests: list[EditRequest]) -> WeightPatch:
        c = self.config
        path = lm.arch.mlp_out_path(c.layer)
        module = lm.model.get_submodule(path)
        delta = torch.zeros_like(module.weight, dtype=torch.float32, requires_grad=True)  # module layout
        layout = lm.arch.layout

        def add_delta(out, args):
            return out + linear_delta_out(args[0].to(delta.dtype), delta, layout).to(out.dtype)

        batches, sizes = request_batches(lm, requests, c.batch_size)
        settings = TrainSettings(steps=c.steps, lr=c.lr, optimizer="adam", weight_decay=c.weight_decay,
                                 early_stop_loss=c.early_stop_loss, desc="ft")
        with Trace(module, retain_output=False, edit_output=add_delta):
            res = train_loop([delta], batches, lambda b: target_nll(lm, b).mean(), settings,
                             weights=sizes,
                             project=lambda: delta.clamp_(-c.norm_constraint, c.norm_constraint))  # the L∞ ball
        mean = res.loss
        log.info("ft: layer %d, final mean NLL %.3f", c.layer, mean)
        param = f"{path}.weight"
        return WeightPatch(method=self.name, config=self.config_dict(), base_fingerprint=lm.fingerprint,
                           requests=list(requests), meta={"preset": self.preset, "final_loss": mean},
                           deltas={param: Delta(dense=delta.detach().to(module.weight.dtype).clone())})
