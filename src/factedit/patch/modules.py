"""Module patches: small trained modules (interventions) hooked onto named sites of the frozen model.

An intervention replaces the hidden state h at chosen token positions of a site (``lm.arch.Site``: a block's
output, the MLP's input or output, the out-projection's input, the attention output) with Φ(h). Positions
are relative to the *prompt*: callers that know where each row's prompt ends say so with
``lm.hooks.forward_context``; without it the whole input of a multi-token forward is the prompt, and a
single-token forward is a decoding step. Decoding steps are left alone (as in ReFT) unless the placement's
positions are ``every`` or the intervention asks for them (``acts_on_decode = True``).

What an intervention class may declare (all optional):
- ``acts_on_decode``: act on decoding steps too;
- ``reads_input``: at an output site, also receive the module's input as ``x=`` (MeG's neuron reads the MLP's
  input and adds to its output);
- ``prepare(ctx, lm) -> state``: per-query work done once per forward context (``ctx.rows`` carries per-row
  data), passed to ``forward`` as ``state=``;
- ``reads_ids``: the token ids of the forward's input are put in ``ctx.rows["input_ids"]`` (by a pre-hook on the
  token embedding, at the prompt's forward, not at decoding steps) for ``prepare`` to read: MeG finds each row's
  query there, whoever runs the forward. Without a forward context the module's ``last_ids`` holds them.

Interventions register themselves with ``@register_intervention(kind)`` in their method's module; a patch that
names an unregistered kind imports its method (through the method registry) before giving up.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import FactEditError
from ..lm.arch import Site, resolve_site
from ..lm.hooks import current_context, first, replace_first
from ..lm.load import LM
from .base import Handle, Patch

INTERVENTIONS: dict[str, type] = {}
POSITION_MODES = ("last", "first_last", "all", "every")


def register_intervention(kind: str):
    """Class decorator: register an intervention class under ``kind`` (a duplicate kind raises)."""

    def deco(cls: type) -> type:
        if kind in INTERVENTIONS and INTERVENTIONS[kind] is not cls:
            raise FactEditError(f"intervention kind '{kind}' is already registered")
        cls.kind = kind
        INTERVENTIONS[kind] = cls
        return cls

    return deco


def intervention_class(kind: str, method: str | None = None) -> type:
    if kind not in INTERVENTIONS and method:
        from ..registry import get_editor_class

        try:
            get_editor_class(method.split("+")[0])  # importing the method registers its interventions
        except FactEditError:
            pass
    if kind not in INTERVENTIONS:
        raise FactEditError(f"unknown intervention kind '{kind}' (known: {', '.join(sorted(INTERVENTIONS))})")
    return INTERVENTIONS[kind]


def position_mask(prompt_lens: torch.Tensor | None, B: int, T: int, mode: str, device, decoding: bool = False,
                  on_decode: bool = False) -> torch.Tensor | None:
    """(B, T) bool mask of the positions to intervene on, or None for none.

    prompt_lens None: the whole input is the prompt, unless it is one token (a decoding step)."""
    if mode not in POSITION_MODES:
        raise FactEditError(f"unknown position mode '{mode}' (known: {', '.join(POSITION_MODES)})")
    if decoding or (prompt_lens is None and T == 1):
        if on_decode or mode == "every":
            return torch.ones(B, T, dtype=torch.bool, device=device)
        return None
    if prompt_lens is None:
        prompt_lens = torch.full((B,), T, dtype=torch.long)
    if prompt_lens.shape[0] != B:
        raise RuntimeError(f"prompt context has {prompt_lens.shape[0]} rows, forward has {B}")
    lens = prompt_lens.to(device)
    pos = torch.arange(T, device=device)[None, :]  # (1, T)
    if mode == "last":
        return pos == (lens - 1)[:, None]
    if mode == "first_last":
        return (pos == 0) | (pos == (lens - 1)[:, None])
    if mode == "all":
        return pos < lens[:, None]
    return torch.ones(B, T, dtype=torch.bool, device=device)  # every: prompt, target and padding alike


@dataclass(frozen=True)
class Placement:
    """Where an intervention acts: a site and the prompt positions there."""

    site: Site
    positions: str = "last"

    def __post_init__(self) -> None:
        if self.positions not in POSITION_MODES:
            raise FactEditError(f"unknown position mode '{self.positions}' (known: {', '.join(POSITION_MODES)})")

    @property
    def layer(self) -> int:
        return self.site.layer


def _apply_iv(lm: LM, place: Placement, module: nn.Module, h: torch.Tensor, x: Any) -> torch.Tensor | None:
    """Φ applied to hidden state h (B, T, d) where the placement and the forward context say; None: untouched."""
    ctx = current_context()
    mask = position_mask(ctx.prompt_lens if ctx else None, h.shape[0], h.shape[1], place.positions, h.device,
                         decoding=bool(ctx and ctx.decoding), on_decode=getattr(module, "acts_on_decode", False))
    if mask is None or not bool(mask.any()):
        return None
    dtype = next(module.parameters()).dtype
    kw: dict[str, Any] = {}
    if getattr(module, "reads_input", False):
        kw["x"] = x.to(dtype)
    if hasattr(module, "prepare"):
        if ctx is None:
            kw["state"] = module.prepare(None, lm)
        else:
            key = id(module)
            if key not in ctx.cache:
                ctx.cache[key] = module.prepare(ctx, lm)
            kw["state"] = ctx.cache[key]
    new = module(h.to(dtype), **kw).to(h.dtype)  # (B, T, d)
    return torch.where(mask[..., None], new, h)


class _Handles:
    """Several torch hook handles removed as one."""

    def __init__(self, *handles: Any) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _ids_hook(lm: LM, module: nn.Module) -> Any:
    """A pre-hook on the token embedding that gives the forward's input ids to the context (``reads_ids``)."""

    def grab(_m, args, kwargs):
        ids = args[0] if args else kwargs.get("input")
        ctx = current_context()
        if ctx is None:
            module.last_ids = ids
        elif not ctx.decoding and not (ctx.prompt_lens is None and ids.shape[1] == 1):
            ctx.rows["input_ids"] = ids

    return lm.model.get_submodule(lm.arch.embed).register_forward_pre_hook(grab, with_kwargs=True)


def install(lm: LM, place: Placement, module: nn.Module, _ids: bool = True) -> Any:
    """Hook ``module`` onto its site of ``lm``; returns the torch hook handle (an object with ``remove()``)."""
    target, where, _ = resolve_site(lm.model, lm.arch, place.site)
    if _ids and getattr(module, "reads_ids", False):
        first_hook = _ids_hook(lm, module)
        try:
            inner = install(lm, place, module, _ids=False)
        except BaseException:
            first_hook.remove()
            raise
        return _Handles(first_hook, inner)
    if where == "output":
        def post(_m, args, out):
            h2 = _apply_iv(lm, place, module, first(out), args[0] if args else None)
            return out if h2 is None else replace_first(out, h2)

        return target.register_forward_hook(post)

    def pre(_m, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h2 = _apply_iv(lm, place, module, h, None)
        if h2 is None:
            return None
        if args:
            return (h2, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h2}

    return target.register_forward_pre_hook(pre, with_kwargs=True)


class ModuleHandle(Handle):
    """Installed hooks of a module patch. A *carried* patch (``meta["carry"]``: a key) holds the whole state of a
    module trained on across rounds (continual LoReFT/BaFT): applying it suspends the newest earlier one of the
    same key, and reverting it resumes that one, so rounds stack and unstack like weight patches."""

    def __init__(self, lm: LM, hooks: list, pairs: list | None = None, carry: str | None = None) -> None:
        super().__init__()
        self.lm, self.hooks, self.pairs, self.carry = lm, hooks, pairs or [], carry

    def _remove(self) -> None:
        for h in self.hooks:
            h.remove()
            if h in self.lm.hooks:
                self.lm.hooks.remove(h)
        self.hooks = []

    def suspend(self) -> None:
        with self.lm.lock:
            self._remove()

    def resume(self) -> None:
        with self.lm.lock:
            if not self.hooks and self.active:
                self.hooks = [install(self.lm, place, module) for place, module in self.pairs]
                self.lm.hooks.extend(self.hooks)

    def _revert(self) -> None:
        with self.lm.lock:
            self._remove()
            if self.carry is not None:
                stack = self.lm.carried.get(self.carry, [])
                top = bool(stack) and stack[-1] is self
                if self in stack:
                    stack.remove(self)
                if top and stack:
                    stack[-1].resume()

    def _merge(self) -> None:
        # Hooked modules are input-dependent and position-dependent: they cannot be folded into the
        # weights. "Merging" keeps them installed for the life of the model object (``lm.reset_hooks`` removes).
        pass


@contextlib.contextmanager
def carried_suspended(lm: LM, carry: str):
    """The newest carried patch of key ``carry`` (if one is applied) suspended for the duration: what a continual
    editor trains on is the model without its own earlier module, which it continues from its state instead."""
    stack = lm.carried.get(carry) or []
    top = stack[-1] if stack else None
    if top is not None:
        top.suspend()
    try:
        yield
    finally:
        if top is not None and stack and stack[-1] is top:
            top.resume()


@dataclass
class ModulePatch(Patch):
    placements: list[Placement] = field(default_factory=list)
    modules: list[nn.Module] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.kind = "modules"
        if len(self.placements) != len(self.modules):
            raise ValueError("one module per placement")

    def apply(self, lm: LM, force: bool = False) -> ModuleHandle:
        self.check_base(lm, force)
        lm.check_layers([p.layer for p in self.placements], "intervention layer")
        carry = self.meta.get("carry")
        with lm.lock:
            if carry is not None and lm.carried.get(carry):
                lm.carried[carry][-1].suspend()
            hooks = []
            for place, module in zip(self.placements, self.modules):
                module.to(lm.device).eval()
                hooks.append(install(lm, place, module))
            lm.hooks.extend(hooks)
            handle = ModuleHandle(lm, hooks, list(zip(self.placements, self.modules)), carry)
            if carry is not None:
                lm.carried.setdefault(carry, []).append(handle)
        return handle

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, m in enumerate(self.modules):
            for k, v in m.state_dict().items():
                out[f"{i}::{k}"] = v.detach().contiguous().cpu()
        return out

    def spec(self) -> dict[str, Any]:
        return {"interventions": [{"site": p.site.kind, "layer": p.layer, "positions": p.positions, "kind": m.kind,
                                   "module": m.spec()} for p, m in zip(self.placements, self.modules)]}

    @classmethod
    def from_parts(cls, manifest: dict, tensors: dict[str, torch.Tensor], **common) -> ModulePatch:
        placements, modules = [], []
        for i, item in enumerate(manifest["spec"]["interventions"]):
            placements.append(Placement(Site(item["site"], int(item["layer"])), positions=item["positions"]))
            module = intervention_class(item["kind"], manifest.get("method")).from_spec(item["module"])
            state = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{i}::")}
            module.load_state_dict(state, strict=True)
            modules.append(module)
        return cls(placements=placements, modules=modules, **common)
