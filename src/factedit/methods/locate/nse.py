"""NSE (specs/locate.md §4): neuron-level sequential editing with weights rewinding, on MEMIT."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ...config import NonNegFloat, PosFloat, PosInt, Probability
from .base import LocateConfig, swapped_weights
from .keys import site_values
from .memit import MEMITEditor
from .solvers import solve

log = logging.getLogger(__name__)


# ---- NSE ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NSEConfig(LocateConfig):
    mom2_update_weight: NonNegFloat = 15000.0
    alpha: NonNegFloat = 2.5  # re-edit requests whose ‖z* − h_L‖ exceeds this (Llama3: 2.5, GPT-J 15, GPT2-XL 35)
    upper_bound: PosFloat = 50.0  # ... but not outliers above this
    max_iterations: PosInt = 3  # passes; the last one only re-checks
    neuron_threshold: Probability = 1.0  # p: neurons covering this fraction of the batch's key mass are updated


class NSEEditor(MEMITEditor):
    name = "nse"
    Config = NSEConfig

    def __init__(self, config=None, preset=None) -> None:
        super().__init__(config, preset)
        self.originals: dict[int, torch.Tensor] = {}  # W_out of the edited layers before any commit

    def _z(self, lm, requests):
        # Weights rewinding: z* always from the original weights of the edited layers.
        if not self.originals:
            return super()._z(lm, requests)
        names = {self._weight(lm, l)[0]: w for l, w in self.originals.items()}
        with swapped_weights(lm, names):
            return super()._z(lm, requests)

    def _layer_update(self, lm, layer, K, R):
        c = self.config
        C0 = self.stats(lm, [layer])[layer].moment()
        d0 = C0.shape[0]
        Kd = K.double().T  # d0 × u
        q = Kd.abs().sum(1)
        order = torch.argsort(q, descending=True)
        csum = torch.cumsum(q[order], 0)
        n = int(torch.searchsorted(csum, c.neuron_threshold * csum[-1] * (1 - 1e-12)).item()) + 1
        S = order[: min(n, d0)].sort().values
        Cp = self._cp(layer, d0)
        KS = Kd[S]
        A = c.mom2_update_weight * C0[S][:, S] + Cp[S][:, S] + KS @ KS.T
        YS = solve(A, KS, f"nse layer {layer}")
        Y = torch.zeros(d0, Kd.shape[1], dtype=torch.float64)
        Y[S] = YS
        self._last_neurons[layer] = int(len(S))
        return R.double().T, Y

    def _edit(self, lm, requests):
        c = self.config
        first = {} if self.originals else {l: self._weight(lm, l)[1].detach().clone() for l in self.edit_layers()}
        with self._phase("stats"):
            self.stats(lm, self.edit_layers())
        with self._phase("z*"):
            zs, infos = self._z(lm, requests)
        self.warn_known(requests, infos)
        factors: dict = {}
        zl = lm.arch.block_path(self.loss_layer_z(lm))
        passes = []
        for it in range(c.max_iterations):
            cur = site_values(lm, requests, zl)
            dist = (zs - cur).norm(dim=1)
            sel = [i for i in range(len(requests)) if c.alpha < float(dist[i]) < c.upper_bound]
            passes.append({"pass": it, "mean_dist": round(float(dist.mean()), 3), "selected": len(sel)})
            if not sel or it == c.max_iterations - 1:
                break
            self._last_neurons = {}
            self._spread(lm, [requests[i] for i in sel], zs[sel], factors)
            passes[-1]["neurons"] = dict(self._last_neurons)  # neurons updated per layer in this pass
        patch = self._patch(lm, requests, factors, {"z": infos, "passes": passes})
        with self._phase("post keys"):
            patch.commit_data.update({f"keys.{l}": K.float().contiguous()
                                      for l, K in self._post_keys(lm, requests).items()})
        # the first round declares the original weights, which every later round's z* rewinds to
        patch.commit_data.update({f"original.{l}": w for l, w in first.items()})
        return patch

    def commit(self, patch) -> None:
        if not self.originals:
            self.originals = {int(k.split(".", 1)[1]): v for k, v in patch.commit_data.items()
                              if k.startswith("original.")}
        super().commit(patch)

    def state_dict(self):
        tensors, meta = super().state_dict()
        tensors.update({f"original.{l}": w for l, w in self.originals.items()})
        return tensors, meta

    def load_state_dict(self, tensors, meta) -> None:
        super().load_state_dict(tensors, meta)
        self.originals = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("original.")}

    def reset_state(self) -> None:
        super().reset_state()
        self.originals = {}
