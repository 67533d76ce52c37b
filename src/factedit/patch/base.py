"""The `Patch` noun: a computed change that can be applied, reverted, merged, saved and loaded."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import FingerprintMismatch
from ..lm.load import LM
from ..types import EditRequest


class Handle(ABC):
    """What `Patch.apply` returns. ``revert()`` restores the model bit-exactly; ``merge()`` makes the
    change permanent (the handle then does nothing). Used as a context manager it reverts on exit
    unless merged."""

    def __init__(self) -> None:
        self.active = True

    @abstractmethod
    def _revert(self) -> None: ...

    @abstractmethod
    def _merge(self) -> None: ...

    def revert(self) -> None:
        if self.active:
            self._revert()
            self.active = False

    def merge(self) -> None:
        if self.active:
            self._merge()
            self.active = False

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


@dataclass
class Patch(ABC):
    method: str
    config: dict[str, Any]
    base_fingerprint: str
    requests: list[EditRequest] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # method extras (e.g. context templates, seed)
    # What committing this patch adds to its editor's sequential state (MEMIT/AlphaEdit: the round's keys; NSE:
    # the original weights on its first round), declared here and saved with the patch (commit.safetensors), so
    # that a resumed stream commits a saved round instead of recomputing it. Not part of the patch's digest.
    commit_data: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    kind: str = field(default="", init=False)

    def check_base(self, lm: LM, force: bool = False) -> None:
        if not force and lm.fingerprint != self.base_fingerprint:
            raise FingerprintMismatch(
                f"patch was computed on a model with fingerprint {self.base_fingerprint}, but {lm.name} has "
                f"{lm.fingerprint}; pass force=True (--force) to apply it anyway"
            )

    @abstractmethod
    def apply(self, lm: LM, force: bool = False) -> Handle: ...

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the patch, flat-named for safetensors."""

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-able description of the patch's structure (everything but tensors)."""

    def save(self, path) -> None:
        from .io import save_patch

        save_patch(self, path)

    @staticmethod
    def load(path) -> Patch:
        from .io import load_patch

        return load_patch(path)

    def n_params(self) -> int:
        return sum(t.numel() for t in self.tensors().values())
