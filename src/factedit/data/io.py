"""Reading record files with errors that name the file (and line) at fault."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

from ..errors import FactEditError


def read_text(path: Path) -> str:
    if not path.is_file():
        raise FactEditError(f"data file '{path}' does not exist")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise FactEditError(f"{path}: cannot read ({e})") from None


def read_records(path) -> list[tuple[str, dict]]:
    """[(where, record)] from a JSON list, JSON Lines or CSV file (optionally .gz)."""
    path = Path(path)
    text = read_text(path)
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(".jsonl"):
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise FactEditError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        return out
    if name.endswith(".csv"):
        try:
            rows = list(csv.DictReader(io.StringIO(text)))
        except csv.Error as e:
            raise FactEditError(f"{path}: not valid CSV ({e})") from None
        return [(f"{path}:{i + 2}", {k: v for k, v in r.items() if k is not None and v not in (None, "")} )
                for i, r in enumerate(rows)]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise FactEditError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise FactEditError(f"{path}: expected a JSON list of records")
    return [(f"{path}[{i}]", r) for i, r in enumerate(data)]


def need(rec: dict, key: str, where: str):
    if not isinstance(rec, dict):
        raise FactEditError(f"{where}: expected an object, got {type(rec).__name__}")
    if key not in rec:
        raise FactEditError(f"{where}: missing field '{key}'")
    return rec[key]
