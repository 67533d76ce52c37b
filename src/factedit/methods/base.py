"""The `Editor` noun: how to turn requests into a `Patch`.

``compute(lm, requests)`` is pure: every parameter of the model is bit-identical afterwards, and
its ``requires_grad`` flags and train/eval mode are restored. Mutation is explicit: ``apply``.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch

from .. import config as cfgmod
from ..errors import FactEditError
from ..fsutil import read_bundle, write_bundle
from ..lm.load import LM
from ..lm.tokens import subject_last_index
from ..patch.base import Handle, Patch
from ..types import EditRequest

log = logging.getLogger(__name__)


@contextlib.contextmanager
def frozen(lm: LM) -> Iterator[None]:
    """Freeze every model parameter for the duration (editors train only their own tensors)."""
    flags = [(p, p.requires_grad) for p in lm.model.parameters()]
    was_training = lm.model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        lm.model.eval()
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        lm.model.train(was_training)


class Editor(ABC):
    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any | None = None, preset: str | None = None) -> None:
        self.config = config if config is not None else self.Config()
        self.preset = preset
        self.explicit: frozenset[str] = frozenset()  # the config keys the user set (overrides), not defaults/preset

    @classmethod
    def create(cls, lm: LM | None = None, overrides: dict[str, Any] | None = None) -> Editor:
        """Defaults < the preset for ``lm``'s family (if any) < ``overrides``."""
        preset, source = ({}, None)
        if lm is not None:
            preset, source = cfgmod.load_preset(cls.name, lm.arch.family, lm.n_layers)
        cfg = cfgmod.build(cls.Config, preset, overrides, what=f"{cls.name} config")
        if source:
            log.info("%s: preset %s", cls.name, source)
        ed = cls(cfg, preset=source)
        ed.explicit = frozenset(overrides or {})
        if lm is not None:
            ed.check_config(lm)
        return ed

    def check_config(self, lm: LM) -> None:
        """Settings that depend on the model, checked right after the config is read (before statistics,
        evaluation or editing)."""
        self.check_layers(lm)

    def check_layers(self, lm: LM) -> None:
        """Every ``layer`` / ``layers`` value must be a layer of ``lm`` (at creation, and again in ``validate``
        for editors constructed directly)."""
        c = self.config
        if hasattr(c, "layer"):
            lm.check_layers([c.layer], f"{self.name} layer")
        if hasattr(c, "layers"):
            if not c.layers:
                raise FactEditError(f"{self.name}: config key 'layers' is empty")
            lm.check_layers(list(c.layers), f"{self.name} layer")

    def config_dict(self) -> dict[str, Any]:
        return cfgmod.to_dict(self.config)

    def validate(self, lm: LM, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """Reject bad requests (and layers the model lacks) before any model work, naming the record."""
        self.check_layers(lm)
        if not requests:
            raise FactEditError("no edit requests given")
        out = []
        for i, r in enumerate(requests):
            if not isinstance(r, EditRequest):
                raise FactEditError(f"request #{i}: expected EditRequest, got {type(r).__name__}")
            try:
                subject_last_index(lm.tokenizer, r.prompt, r.subject)
            except FactEditError as e:
                raise FactEditError(f"{r.label}: {e}") from None
            out.append(r)
        return out

    def compute(self, lm: LM, requests: Sequence[EditRequest]) -> Patch:
        requests = self.validate(lm, requests)
        # compute changes the shared model while it runs (in-place edits it undoes, a cut block list, autocast
        # hooks): it holds the model's lock, which scoring, apply and revert take too
        with lm.lock, frozen(lm), torch.enable_grad():
            return self._compute(lm, requests)

    @abstractmethod
    def _compute(self, lm: LM, requests: list[EditRequest]) -> Patch: ...

    def apply(self, lm: LM, requests: Sequence[EditRequest]) -> tuple[Patch, Handle]:
        """Compute, apply, and advance the editor's sequential state (see ``commit``)."""
        patch = self.compute(lm, requests)
        handle = patch.apply(lm)
        self.commit(patch)
        return patch, handle

    # ---- sequential state ------------------------------------------------------------------------------
    # Editors that remember past edits (MEMIT-seq, AlphaEdit and NSE accumulate past keys) advance their
    # state only in ``commit(patch)``, called once a computed patch has been applied to the model for
    # good. ``compute`` alone never changes what the next edit does, so single-case evaluation (apply,
    # score, revert) cannot leak state between independent edits.
    def commit(self, patch: Patch) -> None:
        return None

    @property
    def remembers_rounds(self) -> bool:
        """Whether the next round's edit depends on the committed earlier rounds beyond the model's weights
        (MEMIT-seq, AlphaEdit and NSE: the accumulated K Kᵀ), so a stream must carry the editor state."""
        return False

    # config keys whose change makes a saved state meaningless (it was accumulated at those layers, with those
    # templates); other keys (λ, steps, ...) may change between rounds
    STATE_KEYS: ClassVar[tuple[str, ...]] = ()

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        return None

    def save_state(self, path, **extra: Any) -> None:
        """Write the sequential state to folder ``path`` (safetensors + JSON), atomically."""
        tensors, meta = self.state_dict()
        write_bundle(path, tensors, {"method": self.name, "config": self.config_dict(), **extra, "meta": meta})

    def load_state(self, path) -> dict[str, Any]:
        """Restore the state saved by ``save_state``; returns the JSON record (with the ``extra`` keys)."""
        got = read_bundle(path)
        if got is None:
            raise FactEditError(f"editor state folder '{path}' is incomplete")
        tensors, rec = got
        if rec.get("method") != self.name:
            raise FactEditError(f"editor state in '{path}' is for method '{rec.get('method')}', not '{self.name}'")
        self.load_state_dict(tensors, rec.get("meta", {}))
        return rec
