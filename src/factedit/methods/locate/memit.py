"""MEMIT (specs/locate.md §2): a batch least-squares edit spread over several layers, with the sequential
variant that accumulates the committed batches' keys."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ...lm.load import LM
from ...patch.weights import WeightPatch
from ...types import EditRequest
from .base import LocateConfig, LocateEditor, z_settings
from .keys import KeyWalker, capture_at, site_values
from .postnorm import through_post_norm
from .solvers import solve
from .values import compute_z

log = logging.getLogger(__name__)


# ---- MEMIT ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MEMITConfig(LocateConfig):
    accumulate: bool = True  # sequential MEMIT (AlphaEdit repo's MEMIT_seq): C_p += K Kᵀ after each committed batch


class MEMITEditor(LocateEditor):
    name = "memit"
    Config = MEMITConfig

    @property
    def accumulates(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.config, "accumulate", True))  # AlphaEdit / NSE configs have no switch: always

    def _z(self, lm: LM, requests) -> tuple[torch.Tensor, list[dict]]:
        """z* at the last edited layer's block output, one per request (at its bare prompt).

        Where that block normalises its MLP output before the residual add (Gemma 2/3, OLMo 2), the
        MLP can move the block output only within the norm's reach (a fixed scale, dominated on Gemma by
        a few large-gain coordinates), and a free δ at the block output asks for changes no MLP can
        make. There δ is optimised at the last layer's out-projection output instead (ROME's site, same
        loss), which that layer can always reach, and z* = h_L + n(v*) − n(m) at the bare prompt."""
        L = self.loss_layer_z(lm)
        post = lm.arch.mlp_post_norm_path(L)
        settings, templates = z_settings(self.config, lm.device), self._templates(lm)
        if post is None:
            return compute_z(lm, requests, templates, lm.arch.block_path(L), settings,
                                    cache=self.config.z_cache)
        mlp = lm.arch.mlp_out_path(L)
        v, infos = compute_z(lm, requests, templates, mlp, settings, cache=self.config.z_cache)
        if not requests:
            return v, infos
        with torch.no_grad():
            got = capture_at(lm, [r.prompt for r in requests], [r.subject for r in requests],
                                    [r.prompt.index(r.subject) for r in requests],
                                    {"m": mlp, "h": lm.arch.block_path(L)}, "output")  # one forward for both
            m, h = got["m"], got["h"]
            norm = lm.model.get_submodule(post)
            dtype = next(norm.parameters()).dtype
            dn = norm(v.to(lm.device, dtype)).float() - norm(m.to(lm.device, dtype)).float()
        return h + dn.cpu(), infos  # capture_at returns float32 on the CPU

    def loss_layer_z(self, lm: LM) -> int:
        return self.edit_layers()[-1]  # MEMIT: z* lives at the last edited layer's output

    def _layer_update(self, lm: LM, layer: int, K: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) with Δ = U Vᵀ for keys K (u × d0) and residuals R (u × d1)."""
        C0 = self.stats(lm, [layer])[layer].moment()
        Kd = K.double().T  # d0 × u
        A = self.config.mom2_update_weight * C0 + self._cp(layer, C0.shape[0]) + Kd @ Kd.T
        Y = solve(A, Kd, f"{self.name} layer {layer}")  # d0 × u
        return R.double().T, Y  # Δ = Rᵀ Yᵀ: (d1 × u)(u × d0)

    def _spread(self, lm: LM, requests, zs: torch.Tensor, factors: dict) -> dict[int, torch.Tensor]:
        """MEMIT §0.4: for each layer ascending, residual (z* − h_L)/(layers left), solve, apply.

        Where the block normalises the MLP output before adding it (Gemma 2/3), the residual is mapped
        through that norm first (``through_post_norm``); MEMIT's derivation assumes the MLP output
        joins the residual stream as it is.

        Returns the keys used per layer. A layer's keys (its out-projection's input) depend only on the
        layers below it, all already edited when they are read, so they are also the keys of the fully
        edited model: what C_p accumulates on commit."""
        layers = self.edit_layers()
        keys = {}
        walker = KeyWalker(lm, requests, self._templates(lm), self.config.key_average)
        zl = lm.arch.block_path(self.loss_layer_z(lm))
        for i, l in enumerate(layers):
            with self._phase("keys"):
                K = walker.keys(l)
                cur = site_values(lm, requests, zl)
            R = (zs - cur) / (len(layers) - i)
            post = lm.arch.mlp_post_norm_path(l)
            if post is not None:  # Gemma 2/3: the MLP output is normalised before the residual add
                with torch.no_grad():
                    mod = lm.model.get_submodule(lm.arch.mlp_out_path(l))
                    m = mod(K.to(device=lm.device, dtype=next(mod.parameters()).dtype)).float()
                    norm = lm.model.get_submodule(post)
                    R = through_post_norm(norm, m, R.to(lm.device)).float().cpu()
            with self._phase("solve"):
                U, V = self._layer_update(lm, l, K, R)
                self._add(lm, l, U, V)
            factors.setdefault(l, []).append((U, V))
            keys[l] = K
        return keys

    def _edit(self, lm: LM, requests: list[EditRequest]) -> WeightPatch:
        with self._phase("stats"):
            self.stats(lm, self.edit_layers())  # fail early on statistics problems, before the z* loop
        with self._phase("z*"):
            zs, infos = self._z(lm, requests)
        self.warn_known(requests, infos)
        factors: dict = {}
        keys = self._spread(lm, requests, zs, factors)
        patch = self._patch(lm, requests, factors, {"z": infos})
        if self.accumulates:
            patch.commit_data.update({f"keys.{l}": K.float().contiguous() for l, K in keys.items()})
        return patch
