"""The `Editor` noun: how to turn requests into a `Patch`.

``compute(lm, requests)`` is pure: every parameter of the model is bit-identical afterwards, and
its ``requires_grad`` flags and train/eval mode are restored. Mutation is explicit: ``apply``.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Iterator, Sequence

import torch

from .. import config as cfgmod
from ..errors import FactEditError
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

    @classmethod
    def create(cls, lm: LM | None = None, overrides: dict[str, Any] | None = None) -> "Editor":
        """Defaults < the preset for ``lm``'s family (if any) < ``overrides``."""
        preset, source = ({}, None)
        if lm is not None:
            preset, source = cfgmod.load_preset(cls.name, lm.arch.family, lm.n_layers)
        cfg = cfgmod.build(cls.Config, preset, overrides, what=f"{cls.name} config")
        if source:
            log.info("%s: preset %s", cls.name, source)
        return cls(cfg, preset=source)

    def config_dict(self) -> dict[str, Any]:
        return cfgmod.to_dict(self.config)

    def validate(self, lm: LM, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """Reject bad requests before any model work, naming the record."""
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
        with frozen(lm), torch.enable_grad():
            return self._compute(lm, requests)

    @abstractmethod
    def _compute(self, lm: LM, requests: list[EditRequest]) -> Patch: ...

    def apply(self, lm: LM, requests: Sequence[EditRequest]) -> tuple[Patch, Handle]:
        patch = self.compute(lm, requests)
        return patch, patch.apply(lm)
