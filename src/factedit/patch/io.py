"""Reading patch folders (written by ``Patch.save``): ``manifest.json`` plus ``tensors.safetensors`` (and
``commit.safetensors`` when the patch declares commit data). No pickle."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from ..errors import FactEditError
from ..types import EditRequest
from .base import COMMIT, FORMAT_VERSION, MANIFEST, TENSORS, Patch


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
