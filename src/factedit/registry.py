"""Method name -> editor class, imported lazily so that `factedit methods` stays instant."""

from __future__ import annotations

import importlib

from .errors import FactEditError

_METHODS: dict[str, tuple[str, str]] = {
    # name: ("module:Class", one-line description)
    "ft": ("factedit.methods.ft:FTEditor", "FT-L: fine-tune one MLP out-projection with an L-inf norm constraint"),
    "rome": ("factedit.methods.locate:ROMEEditor", "ROME: rank-one closed-form edit of one MLP out-projection"),
    "memit": ("factedit.methods.locate:MEMITEditor", "MEMIT: batch least-squares edit spread over several layers"),
    "alphaedit": ("factedit.methods.locate:AlphaEditEditor", "AlphaEdit: MEMIT projected onto the null space of preserved keys"),
    "nse": ("factedit.methods.locate:NSEEditor", "NSE: neuron-level sequential editing with weights rewinding"),
    "loreft": ("factedit.methods.reft:LoReFTEditor", "LoReFT: low-rank representation intervention on block outputs"),
    "baft": ("factedit.methods.reft:BaFTEditor",
             "BaFT: ReFT with an input-dependent weight per basis (gated), locality and load-balancing terms"),
    "mend": ("factedit.methods.hyper.editor:MENDEditor", "MEND: a trained hyper-network's per-token shifts, summed"),
    "malmen": ("factedit.methods.hyper.editor:MALMENEditor",
               "MALMEN: a trained hyper-network's shifts aggregated by least squares (normal equation)"),
}


def register(name: str, target: str, description: str = "") -> None:
    """Register an editor class given as "module:Class" under ``name``; a name taken by another class raises."""
    if name in _METHODS:
        if _METHODS[name][0] != target:
            raise FactEditError(f"method name '{name}' is already registered (by {_METHODS[name][0]})")
        return  # the same class again: nothing to do
    _METHODS[name] = (target, description)


def list_methods() -> dict[str, str]:
    return {k: v[1] for k, v in sorted(_METHODS.items())}


def get_editor_class(name: str):
    if name not in _METHODS:
        raise FactEditError(f"unknown method '{name}' (known: {', '.join(sorted(_METHODS))})")
    mod, cls = _METHODS[name][0].split(":")
    return getattr(importlib.import_module(mod), cls)


def unregister(name: str) -> None:
    """Remove a registered method (for methods registered at run time, e.g. by tests)."""
    _METHODS.pop(name, None)
