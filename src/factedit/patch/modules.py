"""Module patches: small trained modules hooked onto a site of the frozen model.

An intervention replaces the hidden state h at chosen token positions of a site's output with
Φ(h). Positions are relative to the *prompt*: the scorer and the generator tell the model where each
prompt ends (``LM.prompt_context``); with no such context the whole input of a multi-token forward is
the prompt, and single-token decoding steps (KV cache) are left untouched, as in ReFT.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import FactEditError
from ..lm.load import LM
from .base import Handle, Patch

# kind -> "module:Class"; each class has spec() -> dict, from_spec(spec) -> instance, and a state_dict.
INTERVENTIONS: dict[str, str] = {
    "loreft": "factedit.methods.reft:LoReFTIntervention",
}
POSITION_MODES = ("last", "first_last", "all")
SITES = ("block_output",)


def intervention_class(kind: str) -> type:
    if kind not in INTERVENTIONS:
        raise FactEditError(f"unknown intervention kind '{kind}' (known: {', '.join(INTERVENTIONS)})")
    mod, cls = INTERVENTIONS[kind].split(":")
    return getattr(importlib.import_module(mod), cls)


def position_mask(prompt_lens: torch.Tensor | None, B: int, T: int, mode: str, device) -> torch.Tensor | None:
    """(B, T) bool mask of the positions to intervene on, or None for none."""
    if prompt_lens is None:
        if T == 1:
            return None  # a decoding step after the prompt
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
    raise FactEditError(f"unknown position mode '{mode}' (known: {', '.join(POSITION_MODES)})")


@dataclass
class Site:
    layer: int
    positions: str = "last"
    site: str = "block_output"

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise FactEditError(f"unknown intervention site '{self.site}' (known: {', '.join(SITES)})")
        if self.positions not in POSITION_MODES:
            raise FactEditError(f"unknown position mode '{self.positions}' (known: {', '.join(POSITION_MODES)})")


def _hook_for(lm: LM, site: Site, module: nn.Module):
    def hook(_mod, _args, output):
        h = output[0] if isinstance(output, tuple) else output  # (B, T, d)
        mask = position_mask(lm.prompt_lens, h.shape[0], h.shape[1], site.positions, h.device)
        if mask is None or not bool(mask.any()):
            return output
        new = module(h.to(next(module.parameters()).dtype)).to(h.dtype)  # (B, T, d)
        h2 = torch.where(mask[..., None], new, h)
        return (h2,) + tuple(output[1:]) if isinstance(output, tuple) else h2

    return hook


class ModuleHandle(Handle):
    def __init__(self, hooks: list) -> None:
        super().__init__()
        self.hooks = hooks

    def _revert(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def _merge(self) -> None:
        # Hooked modules are input-dependent and position-dependent: they cannot be folded into the
        # weights. "Merging" keeps them installed for the life of the model object.
        pass


@dataclass
class ModulePatch(Patch):
    sites: list[Site] = field(default_factory=list)
    modules: list[nn.Module] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.kind = "modules"
        if len(self.sites) != len(self.modules):
            raise ValueError("one module per site")

    def apply(self, lm: LM, force: bool = False) -> ModuleHandle:
        self.check_base(lm, force)
        lm.check_layers([s.layer for s in self.sites], "intervention layer")
        hooks = []
        for site, module in zip(self.sites, self.modules):
            module.to(lm.device).eval()
            block = lm.model.get_submodule(lm.arch.block_path(site.layer))
            hooks.append(block.register_forward_hook(_hook_for(lm, site, module)))
        return ModuleHandle(hooks)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, m in enumerate(self.modules):
            for k, v in m.state_dict().items():
                out[f"{i}::{k}"] = v.detach().contiguous().cpu()
        return out

    def spec(self) -> dict[str, Any]:
        return {"interventions": [{"site": s.site, "layer": s.layer, "positions": s.positions, "kind": m.kind,
                                   "module": m.spec()} for s, m in zip(self.sites, self.modules)]}

    @classmethod
    def from_parts(cls, manifest: dict, tensors: dict[str, torch.Tensor], **common) -> ModulePatch:
        sites, modules = [], []
        for i, item in enumerate(manifest["spec"]["interventions"]):
            sites.append(Site(layer=int(item["layer"]), positions=item["positions"], site=item["site"]))
            module = intervention_class(item["kind"]).from_spec(item["module"])
            state = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{i}::")}
            module.load_state_dict(state, strict=True)
            modules.append(module)
        return cls(sites=sites, modules=modules, **common)
