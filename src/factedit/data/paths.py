"""Where benchmark data lives: a path the user gives, else FACTEDIT_DATA, else the ``shared/data``
folder beside the checkout. Data is read in place, never copied into the repository."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import FactEditError

# files that are not benchmarks (a benchmark's default file is declared in its registry entry, eval/benches.py)
BENCH_FILES = {"wikitext": "wikitext-2/test.txt.gz"}


def default_data_dir() -> Path | None:
    env = os.environ.get("FACTEDIT_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for base in (Path.cwd(), *here.parents):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return None


def default_bench_file(bench: str) -> Path:
    root = default_data_dir()
    if root is None:
        raise FactEditError(f"no data folder found for '{bench}': pass --data FILE or set FACTEDIT_DATA")
    if bench in BENCH_FILES:
        return root / BENCH_FILES[bench]
    from ..eval.benches import get_benchmark

    return root / get_benchmark(bench).default_file


def general_text(data_dir: Path | None) -> str | None:
    """The general-ability text (WikiText-2 test) in ``data_dir``, or None where there is none."""
    from .io import read_text

    if data_dir is None:
        return None
    path = data_dir / BENCH_FILES["wikitext"]
    return read_text(path) if path.exists() else None
