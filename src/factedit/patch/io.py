"""Patch folders: ``manifest.json`` (format version, method, resolved config, base fingerprint,
requests, structure) plus ``tensors.safetensors``. No pickle. Written to a temporary folder and
renamed into place, so an interrupted save leaves nothing half-written."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..errors import FactEditError
from ..fsutil import atomic_dir
from ..types import EditRequest
from ..version import __version__
from .base import Patch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
COMMIT = "commit.safetensors"  # the patch's commit data (Patch.commit_data), when it has any


def save_patch(patch: Patch, path) -> Path:
    path = Path(path)
    manifest = {
        "format_version": FORMAT_VERSION,
        "factedit_version": __version__,
        "kind": patch.kind,
        "method": patch.method,
        "config": patch.config,
        "base_fingerprint": patch.base_fingerprint,
        "requests": [r.to_dict() for r in patch.requests],
        "meta": patch.meta,
        "spec": patch.spec(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_dir(path) as tmp:
        save_file(patch.tensors(), str(tmp / TENSORS), metadata={"format": "factedit-patch"})
        if patch.commit_data:
            save_file({k: v.detach().contiguous().cpu() for k, v in patch.commit_data.items()}, str(tmp / COMMIT))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return path


def patch_digest(path) -> str:
    """SHA-256 (first 16 hex digits) of a saved patch's tensors: what it does to a model, whatever its
    manifest's timings say. Sequential editor states name the rounds they committed by it."""
    import hashlib

    f = Path(path) / TENSORS
    if not f.is_file():
        raise FactEditError(f"patch folder '{path}' is incomplete: {TENSORS} is missing")
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_patch(path) -> Patch:
    from .modules import ModulePatch
    from .weights import WeightPatch

    path = Path(path)
    if not path.is_dir():
        raise FactEditError(f"patch folder '{path}' does not exist")
    for name in (MANIFEST, TENSORS):
        if not (path / name).is_file():
            raise FactEditError(f"patch folder '{path}' is incomplete: {name} is missing")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise FactEditError(f"{path / MANIFEST}: not valid JSON ({e})") from None
    for key in ("format_version", "kind", "method", "config", "base_fingerprint", "spec"):
        if key not in manifest:
            raise FactEditError(f"{path / MANIFEST}: missing '{key}'")
    if manifest["format_version"] > FORMAT_VERSION:
        raise FactEditError(f"{path}: patch format {manifest['format_version']} is newer than this factedit "
                            f"understands ({FORMAT_VERSION})")
    try:
        tensors = load_file(str(path / TENSORS))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise FactEditError(f"{path / TENSORS}: cannot read ({e})") from None
    common = dict(method=manifest["method"], config=manifest["config"], base_fingerprint=manifest["base_fingerprint"],
                  requests=[EditRequest.from_dict(r, where=f"{path}") for r in manifest.get("requests", [])],
                  meta=manifest.get("meta", {}))
    kinds = {"weights": WeightPatch, "modules": ModulePatch}
    if manifest["kind"] not in kinds:
        raise FactEditError(f"{path / MANIFEST}: unknown patch kind '{manifest['kind']}'")
    try:
        patch = kinds[manifest["kind"]].from_parts(manifest, tensors, **common)
    except KeyError as e:
        raise FactEditError(f"{path}: tensors file lacks {e}") from None
    if (path / COMMIT).is_file():
        try:
            patch.commit_data = load_file(str(path / COMMIT))
        except Exception as e:  # noqa: BLE001 - as above
            raise FactEditError(f"{path / COMMIT}: cannot read ({e})") from None
    return patch
