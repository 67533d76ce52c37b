"""ROME (specs/locate.md §1): a rank-one closed-form edit of one MLP out-projection per request."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ...config import NonNegInt, PosFloat, PosInt
from ...errors import FactEditError
from .base import KeyAverage, LocateConfig, LocateEditor, z_settings
from .keys import average_keys, site_values, template_keys
from .solvers import solve
from .values import compute_z

log = logging.getLogger(__name__)


# ---- ROME -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ROMEConfig(LocateConfig):
    layers: tuple[int, ...] = (5,)  # exactly one layer
    clamp_norm_factor: PosFloat = 4.0
    template_lengths: tuple[int, ...] = (5, 10)
    templates_per_length: NonNegInt = 10
    key_average: KeyAverage = "flat"
    mom2_adjustment: bool = True  # C = E[k kᵀ]; False: C = I (the Llama3 setting of the NSE/AlphaEdit repos)
    z_batch: PosInt = 1  # each request's v* is computed on the model after the previous requests' edits
    z_cache: bool = False  # each v* sees the previous edits, so a stored one is reused only on a re-run;
    # the weights digest (~3 s on SmolLM2) would cost more per request than it saves


class ROMEEditor(LocateEditor):
    name = "rome"
    Config = ROMEConfig
    accumulates = False

    def check_layers(self, lm):
        super().check_layers(lm)
        if len(self.config.layers) != 1:
            raise FactEditError(f"rome edits exactly one layer; got layers {list(self.config.layers)}")

    def _edit(self, lm, requests):
        c = self.config
        layer = self.edit_layers()[0]
        C = self.stats(lm, [layer])[layer].moment() if c.mom2_adjustment else None
        site = lm.arch.mlp_out_path(layer)
        factors: dict = {layer: []}
        infos = []
        templates = self._templates(lm)
        for r in requests:  # ROME is sequential by nature: each edit sees the previous ones
            with self._phase("keys"):
                k = template_keys(lm, [r], templates, [layer])[layer].double()  # (1, n_templates, d0)
            k_avg, k_bare = average_keys(k, c.key_average)[0], k[0, 0]  # template 0 is "{}"
            with self._phase("z*"):
                v_star, info = compute_z(lm, [r], templates, site, z_settings(c, lm.device), progress=False,
                                                  cache=c.z_cache)
            infos.extend(info)
            self.warn_known([r], info)
            with self._phase("solve"):
                u = solve(C, k_avg[:, None], f"rome layer {layer}")[:, 0] if C is not None else k_avg.clone()
            u = u / u.norm()
            with self._phase("keys"):
                cur = site_values(lm, [r], site)[0].double()  # W k + b at the bare prompt
            right = (v_star[0].double() - cur) / torch.dot(k_bare, u)
            U, V = right[:, None], u[:, None]
            self._add(lm, layer, U, V)
            factors[layer].append((U, V))
        return self._patch(lm, requests, factors, {"z": infos})
