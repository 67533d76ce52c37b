"""zsRE: MEND-format records (src/alt/answers/rephrase/loc) and KnowEdit-format records."""

from __future__ import annotations

from ..errors import FactEditError
from ..types import EditRequest, EvalCase
from .io import need, read_records


def _first(v):
    return v[0] if isinstance(v, list) and v else v


def _mend_case(rec: dict, where: str, case_id, target: str) -> EvalCase:
    # MEMIT/AlphaEdit/NSE edit the *correct* answer (answers[0]); EasyEdit edits `alt`.
    new = _first(need(rec, "answers", where)) if target == "answer" else need(rec, "alt", where)
    req = EditRequest(prompt=need(rec, "src", where), subject=need(rec, "subject", where), target_new=new,
                      case_id=case_id, where=where)
    loc = need(rec, "loc", where)
    # MEMIT appends "?" to the NQ question (it keeps the "nq question: " prefix)
    return EvalCase(request=req, paraphrase_prompts=(need(rec, "rephrase", where),),
                    locality=((loc + "?", need(rec, "loc_ans", where)),))


def _knowedit_case(rec: dict, where: str, case_id) -> EvalCase:
    req = EditRequest(prompt=need(rec, "prompt", where), subject=need(rec, "subject", where),
                      target_new=need(rec, "target_new", where), case_id=case_id, where=where)
    locs = []
    for items in (rec.get("locality") or {}).values():
        for it in items:
            locs.append((need(it, "prompt", where), _first(need(it, "ground_truth", where))))
    para = rec.get("rephrase_prompt")
    return EvalCase(request=req, paraphrase_prompts=(para,) if para else (), locality=tuple(locs))


def load_zsre(path, limit: int | None = None, target: str = "answer") -> list[EvalCase]:
    """Cases from a zsRE file; ``target`` picks the MEND-format edit target: "answer" (MEMIT protocol,
    the gold answer) or "alt" (EasyEdit protocol, the alternative answer)."""
    if target not in ("answer", "alt"):
        raise FactEditError(f"zsRE target must be 'answer' or 'alt', got {target!r}")
    records = read_records(path)
    if not records:
        raise FactEditError(f"{path}: no records")
    out = []
    for i, (where, rec) in enumerate(records[: limit or None]):
        if not isinstance(rec, dict):
            raise FactEditError(f"{where}: expected an object, got {type(rec).__name__}")
        cid = rec.get("case_id", i)
        out.append(_mend_case(rec, where, cid, target) if "src" in rec else _knowedit_case(rec, where, cid))
    return out
