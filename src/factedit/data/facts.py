"""User facts: JSON Lines, JSON or CSV with fields prompt, subject, target_new[, target_true, case_id]."""

from __future__ import annotations

from importlib import resources

from ..errors import FactEditError
from ..types import EditRequest, EvalCase
from .io import read_records


def load_facts(path) -> list[EditRequest]:
    records = read_records(path)
    if not records:
        raise FactEditError(f"{path}: no facts")
    out = [EditRequest.from_dict(rec, where=where) for where, rec in records]
    ids = [r.case_id for r in out if r.case_id is not None]
    if len(ids) != len(set(ids)):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise FactEditError(f"{path}: case_id {dup!r} appears more than once")
    return out


def demo_cases() -> list[EvalCase]:
    """The example facts shipped inside the package (used by `factedit demo`)."""
    path = resources.files("factedit") / "data" / "examples" / "demo.jsonl"
    out = []
    for where, rec in read_records(path):
        req = EditRequest.from_dict(rec, where=where)
        out.append(EvalCase(request=req, paraphrase_prompts=tuple(rec.get("paraphrases", ())),
                            neighborhood_prompts=tuple(rec.get("neighborhood", ())),
                            generation_prompts=(req.prompt,)))
    return out
