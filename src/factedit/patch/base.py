"""The `Patch` noun: a computed change that can be applied, reverted, merged, saved and loaded."""

from __future__ import annotations

import datetime as _dt
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import FingerprintMismatch
from ..fsutil import atomic_dir
from ..lm.load import LM
from ..types import EditRequest
from ..version import __version__

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
COMMIT = "commit.safetensors"  # the patch's commit data (Patch.commit_data), when it has any

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
COMMIT = "commit.safetensors"  # the patch's commit data (Patch.commit_data), when it has any


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

    def save(self, path) -> Path:
        """Write the patch folder: ``manifest.json`` (format version, method, resolved config, base fingerprint,
        requests, structure) plus ``tensors.safetensors`` (and ``commit.safetensors`` for commit data). Written
        to a temporary folder and renamed into place, so an interrupted save leaves nothing half-written. Read it
        back with ``factedit.patch.io.load_patch``."""
        from safetensors.torch import save_file

        path = Path(path)
        manifest = {
            "format_version": FORMAT_VERSION,
            "factedit_version": __version__,
            "kind": self.kind,
            "method": self.method,
            "config": self.config,
            "base_fingerprint": self.base_fingerprint,
            "requests": [r.to_dict() for r in self.requests],
            "meta": self.meta,
            "spec": self.spec(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        with atomic_dir(path) as tmp:
            save_file(self.tensors(), str(tmp / TENSORS), metadata={"format": "factedit-patch"})
            if self.commit_data:
                save_file({k: v.detach().contiguous().cpu() for k, v in self.commit_data.items()}, str(tmp / COMMIT))
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        return path

    def n_params(self) -> int:
        return sum(t.numel() for t in self.tensors().values())
