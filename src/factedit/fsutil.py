"""Crash-safe file helpers: atomic JSON writes and append-only JSON Lines that survive interruption."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_file(path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it replaces ``path`` by a rename, on any
    error (or interruption) it is removed, so ``path`` is never left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj: Any) -> None:
    """Write ``obj`` to ``path`` through a temporary file and an atomic rename."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def write_bundle(path, tensors: dict, record: dict, name: str = "state", *, metadata: dict | None = None,
                 json_default=str) -> None:
    """Write folder ``path`` holding ``<name>.safetensors`` (the tensors) and ``<name>.json`` (the record),
    atomically: editor states, training checkpoints and trained editors. No pickle."""
    from safetensors.torch import save_file

    with atomic_dir(Path(path)) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"),
                  metadata=metadata)
        (tmp / f"{name}.json").write_text(json.dumps(record, indent=1, default=json_default))


def read_bundle(path, name: str = "state") -> tuple[dict, dict] | None:
    """(tensors, record) of a folder written by ``write_bundle``, or None when either file is missing."""
    from safetensors.torch import load_file

    files = (Path(path) / f"{name}.json", Path(path) / f"{name}.safetensors")
    if not all(f.is_file() for f in files):
        return None
    try:
        record = json.loads(files[0].read_text())
    except ValueError as e:
        from .errors import FactEditError

        raise FactEditError(f"{files[0]}: not valid JSON ({e})") from None
    return load_file(str(files[1])), record


def read_jsonl(path) -> list[dict]:
    """Records of a JSON Lines file; a torn last line (interrupted write) is dropped and truncated."""
    path = Path(path)
    if not path.exists():
        return []
    out, good = [], 0
    with open(path, "rb") as f:
        data = f.read()
    for line in data.split(b"\n"):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line) + 1
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(min(good, len(data)))
    return out


class JsonlWriter:
    """Append records one line at a time, flushed so that a killed run keeps every finished record."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec, default=str) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def atomic_dir(path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``path`` by a rename, on any
    error (or interruption) it is removed, so ``path`` is never left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
