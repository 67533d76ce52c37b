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

import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ...config import NonNegFloat, NonNegInt, PosFloat, PosInt, Probability
from ...errors import FactEditError
from ...hw import bf16_units, resolve_autocast
from ...lm.load import LM
from ...patch.weights import Delta, WeightPatch
from ...stats import KeyStats, cached_statistics, default_corpus, key_stats
from ...types import EditRequest
from ..base import Editor
from .keys import compute_keys
from .templates import context_templates
from .values import ZSettings

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
    early_stop_prob: Probability = 0.0  # also stop a request once its target probability reaches this (0: off)
    template_lengths: tuple[int, ...] = (10,)  # one group of sampled prefixes per length
    templates_per_length: NonNegInt = 5
    template_seed: int = 0
    key_average: KeyAverage = "group"  # "group" (MEMIT: bare and prefixed halves) or "flat" (ROME)
    z_batch: PosInt = 16  # requests optimised together in the z* loop
    z_fast: bool = True  # reuse hidden states below the site, LM head only where the loss reads
    # bf16 autocast in the MLPs and the LM head during the z* steps. "auto": bf16 where the CPU has native bf16
    # products (avx512_bf16 or AMX; factedit.hw), fp32 elsewhere; "none" or "bf16" force one
    autocast: Literal["auto", "none", "bf16"] = "auto"
    z_cache: bool = True  # keep each z* on disk per weights digest and reuse it (ZStore)
    mom2_corpus: str | None = None  # text file for key statistics (None: shared WikiText-2 validation)
    mom2_tokens: PosInt = 200_000
    mom2_max_len: PosInt = 512
    mom2_update_weight: NonNegFloat = 15000.0  # λ in λ·C0


_told: set = set()


def z_settings(c: LocateConfig, device: torch.device | str) -> ZSettings:
    """The z* settings of a locate config on ``device`` (``autocast=auto`` decided there, said once)."""
    autocast = resolve_autocast(c.autocast, device)
    if c.autocast == "auto" and (str(device), autocast) not in _told:
        _told.add((str(device), autocast))
        units = ", ".join(bf16_units()) or "none"
        log.info("z*: autocast=auto -> %s on %s (native bf16 units: %s); --set autocast=none|bf16 to choose",
                 "bf16 in the MLPs and the LM head" if autocast == "bf16" else "fp32", device, units)
    return ZSettings(steps=c.v_steps, lr=c.v_lr, clamp_norm_factor=c.clamp_norm_factor,
                     kl_factor=c.kl_factor, kl_direction=c.kl_direction, weight_decay=c.v_weight_decay,
                     early_stop_loss=c.early_stop_loss, early_stop_prob=c.early_stop_prob, batch=c.z_batch,
                     fast=c.z_fast, autocast=autocast)


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
            self.templates = context_templates(lm, c.template_lengths, c.templates_per_length, c.template_seed)
        return self.templates

    def stats(self, lm: LM, layers: list[int]) -> dict[int, KeyStats]:
        missing = [l for l in layers if l not in self._stats]
        if missing:
            c = self.config
            self._stats.update(key_stats(lm, missing, c.mom2_corpus, c.mom2_tokens, c.mom2_max_len))
        return {l: self._stats[l] for l in layers}

    def check_config(self, lm: LM) -> None:
        super().check_config(lm)
        self._pick_statistics(lm)

    STATS_KEYS = ("mom2_corpus", "mom2_tokens", "mom2_max_len")

    def _pick_statistics(self, lm: LM) -> None:
        """Reuse the key statistics that ``factedit stats`` computed: unless the user named the statistics
        settings, and when the configured ones are not in the cache, take the cached statistics that cover the
        edited layers (refused, with the list, when there are several)."""
        if self.explicit & set(self.STATS_KEYS):
            return  # named: exactly those (computed if missing)
        have = [h for h in cached_statistics(lm, self.edit_layers()) if Path(h["corpus"]).is_file()]
        if not have:
            return
        c = self.config
        want_corpus = c.mom2_corpus if c.mom2_corpus is not None else default_corpus()
        if any(h["corpus"] == str(want_corpus) and h["tokens"] == c.mom2_tokens and h["max_len"] == c.mom2_max_len
               for h in have):
            return  # the configured statistics are cached
        if len(have) > 1:
            listed = "; ".join(f"--set mom2_corpus={h['corpus']} --set mom2_tokens={h['tokens']} "
                               f"--set mom2_max_len={h['max_len']}" for h in have)
            raise FactEditError(f"{self.name}: the cache holds several key statistics for layers "
                                f"{self.edit_layers()} and none with the configured settings; name one: {listed}")
        h = have[0]
        self.config = dataclasses.replace(c, mom2_corpus=h["corpus"], mom2_tokens=h["tokens"], mom2_max_len=h["max_len"])
        log.info("%s: using the cached key statistics of %s (%d tokens, windows of %d) for layers %s; set "
                 "mom2_corpus / mom2_tokens / mom2_max_len to choose others", self.name, h["corpus"], h["tokens"],
                 h["max_len"], self.edit_layers())

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
        if "z" in meta:  # how many z* came from the store (computed by an earlier call or another method)
            meta["z_from_store"] = sum(bool(i.get("stored")) for i in meta["z"])
            meta["z_autocast"] = resolve_autocast(self.config.autocast, lm.device)  # what autocast=auto chose
        return WeightPatch(method=self.name, config=self.config_dict(), base_fingerprint=lm.fingerprint,
                           requests=list(requests), meta=meta, deltas=deltas)

    def _compute(self, lm: LM, requests: list[EditRequest]) -> WeightPatch:
        self._phase_s: dict[str, float] = {}
        with restored(lm, [self._weight(lm, l)[0] for l in self.edit_layers()]), torch.no_grad():
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
        return compute_keys(lm, requests, self._templates(lm), self.edit_layers(), self.config.key_average)

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


@contextmanager
def restored(lm: LM, names) -> Iterator[None]:
    """Put the named parameters back to their current values on exit (bit-exact copies)."""
    params = dict(lm.model.named_parameters())
    saved = {n: params[n].detach().clone() for n in names}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)


@contextmanager
def swapped_weights(lm: LM, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily replace named parameters' values (used by NSE to rewind to the original weights)."""
    params = dict(lm.model.named_parameters())
    with restored(lm, weights):
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
        yield
