"""Locate-then-edit editors: ROME, MEMIT, AlphaEdit and NSE (specs/locate.md).

All four edit MLP out-projections W (d1 × d0, keys k ∈ R^d0 are its inputs) in closed form:

- ROME: one layer, one rank-one update per request, W' k* = v* exactly; u = C⁻¹k*/‖C⁻¹k*‖.
- MEMIT: z* at the last edited layer, residual spread over the layers in ascending order,
  Δ = R Kᵀ (λ C0 + C_p + K Kᵀ)⁻¹ per layer, C_p = Σ K Kᵀ of past (committed) batches.
- AlphaEdit: Δ = R Kᵀ P (P (K Kᵀ + C_p) + L2·I)⁻¹ — written as the solve (P(KKᵀ + C_p) + L2·I) Y = P K,
  Δ = R Yᵀ — with P the projector onto the small-eigenvalue directions of C0.
- NSE: MEMIT with z* from the original weights, updates restricted to the neurons that carry most of
  the batch's key mass, and up to ``max_iterations`` passes over requests not yet at their target.

Every update is kept factored (Δ = U Vᵀ of rank ≤ batch size) and solved in float64. ``compute`` edits
the weights in place while it works (MEMIT's residual spreading needs the partially edited model) and
restores them bit-exactly before returning. Sequential state — accumulated K Kᵀ per layer, the
templates, NSE's original weights — advances only in ``commit`` and is saved with ``save_state``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import NonNegFloat, NonNegInt, PosFloat, PosInt, Probability
from ..errors import FactEditError
from ..lm.load import LM
from ..locate import common
from ..locate.stats import KeyStats, key_stats, null_projector
from ..patch.weights import Delta, WeightPatch
from ..types import EditRequest
from .base import Editor

log = logging.getLogger(__name__)
KeyAverage = Literal["group", "flat"]  # MEMIT: mean of the bare and prefixed halves; ROME: flat mean


@dataclass(frozen=True)
class LocateConfig:
    layers: tuple[int, ...] = (4, 5, 6, 7, 8)  # edited MLP out-projections (Llama-3-8B defaults)
    v_steps: PosInt = 25
    v_lr: PosFloat = 0.5
    clamp_norm_factor: PosFloat = 0.75
    kl_factor: NonNegFloat = 0.0625
    kl_direction: Literal["current_initial", "initial_current"] = "current_initial"  # the reference code's KL(P_δ ‖ P_orig); "initial_current" for the other
    v_weight_decay: NonNegFloat = 0.5
    early_stop_loss: NonNegFloat = 0.05
    template_lengths: tuple[int, ...] = (10,)  # one group of sampled prefixes per length
    templates_per_length: NonNegInt = 5
    template_seed: int = 0
    key_average: KeyAverage = "group"  # "group" (MEMIT: bare and prefixed halves) or "flat" (ROME)
    z_batch: PosInt = 16  # requests optimised together in the z* loop
    z_fast: bool = True  # reuse hidden states below the site, LM head only where the loss reads
    autocast: Literal["none", "bf16"] = "none"  # "none" or "bf16" for the z* forward/backward
    z_cache: bool = True  # keep each z* on disk per weights digest and reuse it (common.ZStore)
    mom2_corpus: str | None = None  # text file for key statistics (None: shared WikiText-2 validation)
    mom2_tokens: PosInt = 200_000
    mom2_max_len: PosInt = 512
    mom2_update_weight: NonNegFloat = 15000.0  # λ in λ·C0


def _z_settings(c: LocateConfig) -> common.ZSettings:
    return common.ZSettings(steps=c.v_steps, lr=c.v_lr, clamp_norm_factor=c.clamp_norm_factor,
                            kl_factor=c.kl_factor, kl_direction=c.kl_direction, weight_decay=c.v_weight_decay,
                            early_stop_loss=c.early_stop_loss, batch=c.z_batch, fast=c.z_fast, autocast=c.autocast)


def _solve(A: torch.Tensor, B: torch.Tensor, what: str) -> torch.Tensor:
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise FactEditError(f"{what}: the system contains NaN or infinite values (check the key statistics)")
    try:
        return torch.linalg.solve(A, B)
    except torch.linalg.LinAlgError:
        raise FactEditError(f"{what}: the system is singular; collect key statistics over more tokens "
                            "(--set mom2_tokens=...) or raise the regulariser") from None


class LocateEditor(Editor):
    """Shared machinery: templates, statistics, weights bookkeeping and the sequential state."""

    Config = LocateConfig
    accumulates = True  # keeps Σ K Kᵀ of committed batches
    STATE_KEYS = ("layers", "template_lengths", "templates_per_length", "template_seed", "key_average")

    @property
    def remembers_rounds(self) -> bool:  # type: ignore[override]
        return bool(self.accumulates)

    def __init__(self, config=None, preset=None) -> None:
        super().__init__(config, preset)
        self.templates: list[str] | None = None
        self.cache_c: dict[int, torch.Tensor] = {}  # layer -> Σ K Kᵀ (float64) of committed batches
        self.n_committed = 0
        self._stats: dict[int, KeyStats] = {}

    # ---- helpers -------------------------------------------------------------------------------------
    def edit_layers(self) -> list[int]:
        return sorted(int(x) for x in self.config.layers)

    def _templates(self, lm: LM) -> list[str]:
        if self.templates is None:
            c = self.config
            self.templates = common.context_templates(lm, c.template_lengths, c.templates_per_length, c.template_seed)
        return self.templates

    def stats(self, lm: LM, layers: list[int]) -> dict[int, KeyStats]:
        missing = [l for l in layers if l not in self._stats]
        if missing:
            c = self.config
            self._stats.update(key_stats(lm, missing, c.mom2_corpus, c.mom2_tokens, c.mom2_max_len))
        return {l: self._stats[l] for l in layers}

    def _validate_config(self, lm: LM) -> None:
        lm.check_layers(self.edit_layers(), "edit layer")

    def validate(self, lm: LM, requests):
        self._validate_config(lm)
        return super().validate(lm, requests)

    @staticmethod
    def _weight(lm: LM, layer: int) -> tuple[str, torch.nn.Parameter]:
        name = f"{lm.arch.mlp_out_path(layer)}.weight"
        return name, lm.model.get_submodule(lm.arch.mlp_out_path(layer)).weight

    @staticmethod
    def _add(lm: LM, layer: int, U: torch.Tensor, V: torch.Tensor) -> None:
        """W += U Vᵀ (U: d1 × r, V: d0 × r) in the module's layout, exactly as WeightPatch.apply adds it."""
        _, w = LocateEditor._weight(lm, layer)
        d = Delta(u=U.float(), v=V.float()) if lm.arch.layout == "linear" else Delta(u=V.float(), v=U.float())
        with torch.no_grad():
            w.add_(d.materialise().to(device=w.device, dtype=w.dtype))

    def _patch(self, lm: LM, requests, factors: dict[int, list[tuple[torch.Tensor, torch.Tensor]]], meta: dict) -> WeightPatch:
        deltas = {}
        for layer, fs in factors.items():
            if not fs:
                continue
            U = torch.cat([f[0] for f in fs], 1).float()
            V = torch.cat([f[1] for f in fs], 1).float()
            name, _ = self._weight(lm, layer)
            deltas[name] = Delta(u=U, v=V) if lm.arch.layout == "linear" else Delta(u=V, v=U)
        meta = {"preset": self.preset, "templates": self.templates, "n_committed_before": self.n_committed, **meta}
        return WeightPatch(method=self.name, config=self.config_dict(), base_fingerprint=lm.fingerprint,
                           requests=list(requests), meta=meta, deltas=deltas)

    def _compute(self, lm: LM, requests: list[EditRequest]) -> WeightPatch:
        self._phase_s: dict[str, float] = {}
        with common.restored(lm, [self._weight(lm, l)[0] for l in self.edit_layers()]), torch.no_grad():
            patch = self._edit(lm, requests)
        patch.meta["phase_s"] = {k: round(v, 2) for k, v in self._phase_s.items()}
        log.info("%s: %d requests: %s", self.name, len(requests),
                 ", ".join(f"{k} {v:.1f} s" for k, v in self._phase_s.items()))
        return patch

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """Accumulates the wall time of a phase of ``compute`` (saved in the patch's meta, logged)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            ph = getattr(self, "_phase_s", None)
            if ph is not None:
                ph[name] = ph.get(name, 0.0) + time.perf_counter() - t0

    @staticmethod
    def warn_known(requests, infos: list[dict]) -> None:
        """Warn about requests whose target is already the model's greedy answer (their edit is ~0);
        z* reads this at its first step (δ = 0, the bare prompt), at no extra cost."""
        for r, info in zip(requests, infos):
            if info.get("known"):
                log.warning("%s: target %r is already the model's answer; its update will be small", r.label,
                            r.target_new)

    def _edit(self, lm: LM, requests: list[EditRequest]) -> WeightPatch:  # pragma: no cover - abstract
        raise NotImplementedError

    def _post_keys(self, lm: LM, requests) -> dict[int, torch.Tensor]:
        """Keys of the batch on the edited model (they feed C_p once the patch is committed)."""
        return common.compute_keys(lm, requests, self._templates(lm), self.edit_layers(), self.config.key_average)

    # ---- sequential state ----------------------------------------------------------------------------
    def commit(self, patch) -> None:
        """C_p += K Kᵀ per layer from the keys the patch declares (commit_data "keys.<layer>", (u, d0))."""
        if not self.accumulates:
            self.n_committed += len(patch.requests)
            return
        keys = {int(k.split(".", 1)[1]): v for k, v in patch.commit_data.items() if k.startswith("keys.")}
        if not keys:
            raise FactEditError(f"{self.name}: commit() needs a patch computed by this editor (it carries the "
                                "round's keys)")
        for l, K in sorted(keys.items()):  # K: (u, d0)
            K = K.double()
            self.cache_c[l] = self.cache_c.get(l, torch.zeros(K.shape[1], K.shape[1], dtype=torch.float64)) + K.T @ K
        self.n_committed += len(patch.requests)

    def state_dict(self):
        tensors = {f"cache_c.{l}": c for l, c in self.cache_c.items()}
        return tensors, {"templates": self.templates, "n_committed": self.n_committed}

    def load_state_dict(self, tensors, meta) -> None:
        self.cache_c = {int(k.split(".", 1)[1]): v.double() for k, v in tensors.items() if k.startswith("cache_c.")}
        self.templates = meta.get("templates")
        self.n_committed = int(meta.get("n_committed", 0))

    def reset_state(self) -> None:
        self.cache_c, self.n_committed, self.templates = {}, 0, None

    def _cp(self, layer: int, d0: int) -> torch.Tensor:
        return self.cache_c.get(layer, torch.zeros(d0, d0, dtype=torch.float64))


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
        settings, templates = _z_settings(self.config), self._templates(lm)
        if post is None:
            return common.compute_z(lm, requests, templates, lm.arch.block_path(L), settings,
                                    cache=self.config.z_cache)
        mlp = lm.arch.mlp_out_path(L)
        v, infos = common.compute_z(lm, requests, templates, mlp, settings, cache=self.config.z_cache)
        if not requests:
            return v, infos
        with torch.no_grad():
            got = common.capture_at(lm, [r.prompt for r in requests], [r.subject for r in requests],
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
        Y = _solve(A, Kd, f"{self.name} layer {layer}")  # d0 × u
        return R.double().T, Y  # Δ = Rᵀ Yᵀ: (d1 × u)(u × d0)

    def _spread(self, lm: LM, requests, zs: torch.Tensor, factors: dict) -> dict[int, torch.Tensor]:
        """MEMIT §0.4: for each layer ascending, residual (z* − h_L)/(layers left), solve, apply.

        Where the block normalises the MLP output before adding it (Gemma 2/3), the residual is mapped
        through that norm first (``common.through_post_norm``); MEMIT's derivation assumes the MLP output
        joins the residual stream as it is.

        Returns the keys used per layer. A layer's keys (its out-projection's input) depend only on the
        layers below it, all already edited when they are read, so they are also the keys of the fully
        edited model: what C_p accumulates on commit."""
        layers = self.edit_layers()
        keys = {}
        walker = common.KeyWalker(lm, requests, self._templates(lm), self.config.key_average)
        zl = lm.arch.block_path(self.loss_layer_z(lm))
        for i, l in enumerate(layers):
            with self._phase("keys"):
                K = walker.keys(l)
                cur = common.site_values(lm, requests, zl)
            R = (zs - cur) / (len(layers) - i)
            post = lm.arch.mlp_post_norm_path(l)
            if post is not None:  # Gemma 2/3: the MLP output is normalised before the residual add
                with torch.no_grad():
                    mod = lm.model.get_submodule(lm.arch.mlp_out_path(l))
                    m = mod(K.to(device=lm.device, dtype=next(mod.parameters()).dtype)).float()
                    norm = lm.model.get_submodule(post)
                    R = common.through_post_norm(norm, m, R.to(lm.device)).float().cpu()
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
        Y = _solve(A, P @ Kd, f"alphaedit layer {layer}")
        return R.double().T, Y


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
        with common.swapped_weights(lm, names):
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
        YS = _solve(A, KS, f"nse layer {layer}")
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
            cur = common.site_values(lm, requests, zl)
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

    def _validate_config(self, lm):
        super()._validate_config(lm)
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
                k = common.template_keys(lm, [r], templates, [layer])[layer].double()  # (1, n_templates, d0)
            k_avg, k_bare = common.average_keys(k, c.key_average)[0], k[0, 0]  # template 0 is "{}"
            with self._phase("z*"):
                v_star, info = common.compute_z(lm, [r], templates, site, _z_settings(c), progress=False,
                                                  cache=c.z_cache)
            infos.extend(info)
            self.warn_known([r], info)
            with self._phase("solve"):
                u = _solve(C, k_avg[:, None], f"rome layer {layer}")[:, 0] if C is not None else k_avg.clone()
            u = u / u.norm()
            with self._phase("keys"):
                cur = common.site_values(lm, [r], site)[0].double()  # W k + b at the bare prompt
            right = (v_star[0].double() - cur) / torch.dot(k_bare, u)
            U, V = right[:, None], u[:, None]
            self._add(lm, layer, U, V)
            factors[layer].append((U, V))
        return self._patch(lm, requests, factors, {"z": infos})
