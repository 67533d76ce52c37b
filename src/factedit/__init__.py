"""factedit: massive and sequential knowledge editing for Hugging Face causal LMs."""

from .errors import FactEditError
from .types import EditRequest, EvalCase
from .version import __version__


def load_lm(name_or_path: str = "smollm2-135m", **kw):
    """Load a model handle (see factedit.lm.load.load_lm)."""
    from .lm.load import load_lm as _load

    return _load(name_or_path, **kw)


def get_editor(name: str, lm=None, **overrides):
    """An editor by registered name, configured from its preset for ``lm``'s family plus ``overrides``."""
    from .registry import get_editor_class

    return get_editor_class(name).create(lm, overrides)


def load_patch(path):
    from .patch.io import load_patch as _load

    return _load(path)


__all__ = ["EditRequest", "EvalCase", "FactEditError", "load_lm", "get_editor", "load_patch", "__version__"]
