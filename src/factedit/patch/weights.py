"""Weight patches: additive deltas on named parameters, dense or factored (ΔW = U Vᵀ)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import FactEditError
from ..lm.load import LM
from .base import Handle, Patch


@dataclass
class Delta:
    """ΔW for one parameter, in the parameter's own storage layout. Either ``dense`` (same shape as
    the parameter) or ``u`` (rows, r) and ``v`` (cols, r) with ΔW = u @ vᵀ."""

    dense: torch.Tensor | None = None
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.dense is None) == (self.u is None or self.v is None):
            raise ValueError("a Delta is either dense or factored (u and v)")

    def materialise(self) -> torch.Tensor:
        return self.dense if self.dense is not None else self.u @ self.v.T  # (rows, r) @ (r, cols)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.dense.shape) if self.dense is not None else (self.u.shape[0], self.v.shape[0])


class WeightStack:
    """The weight patches applied to one model now, in order, and the base value of every parameter they touch.

    Reverting a patch puts each parameter it touched back to its base value and re-adds the deltas of the
    patches still applied, in their order: the result is bit-identical to applying only those patches, whatever
    order patches are reverted in (in low precision w + d − d is not w, so nothing is ever subtracted)."""

    def __init__(self) -> None:
        self.base: dict[str, torch.Tensor] = {}  # exact copies of the touched parameters before any patch
        self.applied: list[WeightHandle] = []

    @staticmethod
    def of(lm: LM) -> WeightStack:
        if lm.weight_stack is None:
            lm.weight_stack = WeightStack()
        return lm.weight_stack

    @torch.no_grad()
    def push(self, handle: WeightHandle) -> None:
        for name, p in handle.params.items():
            if name not in self.base:
                self.base[name] = p.detach().clone()
            p.add_(handle.delta(name))
        self.applied.append(handle)

    @torch.no_grad()
    def remove(self, handle: WeightHandle) -> None:
        self.applied.remove(handle)
        for name, p in handle.params.items():
            p.copy_(self.base[name])
            for h in self.applied:
                if name in h.params:
                    p.add_(h.delta(name))
        self._settle(list(handle.params))

    def merged(self, handle: WeightHandle) -> None:
        """``handle``'s change is kept for good."""
        self._settle(list(handle.params))

    def _settle(self, names: list[str]) -> None:
        """Where only merged patches still touch a parameter, nothing there can be reverted any more: its base copy
        is dropped (its current value is the new base) and the merged handles forget it."""
        for name in names:
            touching = [h for h in self.applied if name in h.params]
            if all(h.is_merged for h in touching):
                self.base.pop(name, None)
                for h in touching:
                    h.params.pop(name)
        self.applied = [h for h in self.applied if h.params]


class WeightHandle(Handle):
    def __init__(self, lm: LM, params: dict[str, torch.nn.Parameter], deltas: dict[str, Delta]) -> None:
        super().__init__()
        self.lm, self.params, self.deltas = lm, params, deltas
        self.is_merged = False

    def delta(self, name: str) -> torch.Tensor:
        p = self.params[name]
        return self.deltas[name].materialise().to(device=p.device, dtype=p.dtype)

    def _revert(self) -> None:
        with self.lm.lock:
            WeightStack.of(self.lm).remove(self)

    def _merge(self) -> None:
        with self.lm.lock:
            self.is_merged = True
            WeightStack.of(self.lm).merged(self)


@dataclass
class WeightPatch(Patch):
    deltas: dict[str, Delta] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kind = "weights"

    @torch.no_grad()
    def apply(self, lm: LM, force: bool = False) -> WeightHandle:
        self.check_base(lm, force)
        params = dict(lm.model.named_parameters())
        for name, d in self.deltas.items():  # validate everything before touching anything
            if name not in params:
                raise FactEditError(f"patch names parameter '{name}', which {lm.name} does not have")
            if tuple(params[name].shape) != d.shape:
                raise FactEditError(f"patch delta for '{name}' has shape {d.shape}, parameter is "
                                    f"{tuple(params[name].shape)}")
        handle = WeightHandle(lm, {n: params[n] for n in self.deltas}, dict(self.deltas))
        with lm.lock:
            WeightStack.of(lm).push(handle)
        return handle

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, d in self.deltas.items():
            if d.dense is not None:
                out[f"{name}::dense"] = d.dense
            else:
                out[f"{name}::u"], out[f"{name}::v"] = d.u, d.v
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def spec(self) -> dict[str, Any]:
        return {"params": {n: {"form": "dense" if d.dense is not None else "factored", "shape": list(d.shape)}
                           for n, d in self.deltas.items()}}

    @classmethod
    def from_parts(cls, manifest: dict, tensors: dict[str, torch.Tensor], **common) -> WeightPatch:
        deltas = {}
        for name, info in manifest["spec"]["params"].items():
            if info["form"] == "dense":
                deltas[name] = Delta(dense=tensors[f"{name}::dense"])
            else:
                deltas[name] = Delta(u=tensors[f"{name}::u"], v=tensors[f"{name}::v"])
        return cls(deltas=deltas, **common)
