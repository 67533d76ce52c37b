"""Trained editors: editors whose tensors are trained once per base model (MEND's and MALMEN's hyper-networks,
MeG's encoder, familiarity network and generator), saved, and then used for many edits.

``fit(lm, cases)`` trains them (through ``methods.train.train_loop``; resumable from a checkpoint folder);
``save_pretrained(dir)`` writes ``editor.safetensors`` plus ``editor.json`` (format version, method, resolved
config, base-model fingerprint, a digest of the training data, training metrics), atomically;
``from_pretrained(dir, lm)`` reads them back and refuses another base model unless forced. A subclass says
which modules it trains (``modules()``), how to build them for a model (``build``) and how to train them
(``_fit``); ``compute`` is refused until the editor is trained or loaded.
"""

from __future__ import annotations

import hashlib
import json
from abc import abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import config as cfgmod
from ..errors import FactEditError, FingerprintMismatch
from ..fsutil import read_bundle, write_bundle
from ..lm.load import LM
from ..types import EvalCase
from .base import Editor, frozen

ARTIFACT_VERSION = 1
NAME = "editor"  # the artifact folder holds editor.json and editor.safetensors (fsutil.write_bundle)
MANIFEST, TENSORS = f"{NAME}.json", f"{NAME}.safetensors"


def data_digest(cases: list[EvalCase]) -> str:
    """SHA-256 (16 hex digits) of the training cases' content: requests and probes, not where they were read."""
    h = hashlib.sha256()
    for c in cases:
        h.update(json.dumps([[r.to_dict() for r in c.requests], c.paraphrase_prompts, c.neighborhood_prompts,
                             c.neighborhood_target, c.locality], default=str).encode())
    return h.hexdigest()[:16]


class TrainedEditor(Editor):
    def __init__(self, config: Any | None = None, preset: str | None = None) -> None:
        super().__init__(config, preset)
        self.trained: dict[str, Any] | None = None  # the artifact record once fitted or loaded

    # ---- what a subclass provides -------------------------------------------------------------------------
    @abstractmethod
    def build(self, lm: LM) -> None:
        """Create the (untrained) modules for ``lm``'s shapes."""

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """The trained modules by name (their state dicts make the artifact)."""

    @abstractmethod
    def _fit(self, lm: LM, cases: list[EvalCase], checkpoint: Path | None,
             val_cases: list[EvalCase] | None = None) -> dict[str, Any]:
        """Train the modules on ``cases`` (``val_cases``: held-out cases to validate on, if the editor does);
        returns the training metrics."""

    # ---- training -----------------------------------------------------------------------------------------
    def fit(self, lm: LM, cases: list[EvalCase], checkpoint: Path | None = None,
            val_cases: list[EvalCase] | None = None) -> dict[str, Any]:
        if not cases:
            raise FactEditError(f"{self.name}: no training cases")
        for c in cases:
            self.validate(lm, list(c.requests))
        self.build(lm)
        with lm.lock, frozen(lm), torch.enable_grad():
            metrics = self._fit(lm, cases, checkpoint, val_cases)
        self.trained = {"base_fingerprint": lm.fingerprint, "model": lm.name, "data_digest": data_digest(cases),
                        "n_train": len(cases), "metrics": metrics}
        return metrics

    def compute(self, lm: LM, requests):
        if self.trained is None:
            raise FactEditError(f"{self.name} is a trained editor: train it first (factedit train --method "
                                f"{self.name} ...) and pass --editor DIR, or call fit()")
        if self.trained["base_fingerprint"] != lm.fingerprint and not self.trained.get("forced"):
            raise FingerprintMismatch(f"{self.name} editor was trained on a model with fingerprint "
                                      f"{self.trained['base_fingerprint']}, not {lm.name} ({lm.fingerprint})")
        return super().compute(lm, requests)

    # ---- the artifact ---------------------------------------------------------------------------------------
    def save_pretrained(self, path) -> Path:
        if self.trained is None:
            raise FactEditError(f"{self.name}: nothing to save, the editor is not trained")
        tensors = {f"{name}::{k}": v for name, m in self.modules().items() for k, v in m.state_dict().items()}
        manifest = {"format_version": ARTIFACT_VERSION, "method": self.name, "config": self.config_dict(),
                    "preset": self.preset, **{k: v for k, v in self.trained.items() if k != "forced"}}
        write_bundle(path, tensors, manifest, NAME, metadata={"format": "factedit-editor"})
        return Path(path)

    @classmethod
    def from_pretrained(cls, path, lm: LM, overrides: dict[str, Any] | None = None,
                        force: bool = False) -> TrainedEditor:
        """The editor saved in ``path``, for ``lm``; ``overrides`` change config keys that training did not fix."""
        path = Path(path)
        got = read_bundle(path, NAME)
        if got is None:
            raise FactEditError(f"'{path}' is not a trained editor folder ({MANIFEST} and {TENSORS} expected)")
        tensors, man = got
        if man.get("method") != cls.name:
            raise FactEditError(f"{path} holds a {man.get('method')} editor, not {cls.name}")
        if int(man.get("format_version", 0)) > ARTIFACT_VERSION:
            raise FactEditError(f"{path}: editor format {man['format_version']} is newer than this factedit reads")
        if man.get("base_fingerprint") != lm.fingerprint and not force:
            raise FingerprintMismatch(f"{path} was trained on a model with fingerprint {man.get('base_fingerprint')}, "
                                      f"not {lm.name} ({lm.fingerprint}); pass force (--force) to use it anyway")
        ed = cls(cfgmod.build(cls.Config, man["config"], overrides, what=f"{cls.name} config"), preset=man.get("preset"))
        ed.check_config(lm)
        ed.build(lm)
        for name, m in ed.modules().items():
            state = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{name}::")}
            m.load_state_dict(state, strict=True)
        ed.trained = {k: man.get(k) for k in ("base_fingerprint", "model", "data_digest", "n_train", "metrics")}
        ed.trained["forced"] = force
        return ed
