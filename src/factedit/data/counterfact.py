"""CounterFact: EasyEdit's split files and ROME/MEMIT's `requested_rewrite` records."""

from __future__ import annotations

import re

from ..errors import FactEditError
from ..types import EditRequest, EvalCase
from .io import need, read_records


def _rome_case(rec: dict, where: str) -> EvalCase:
    rw = need(rec, "requested_rewrite", where)
    if isinstance(rw, list):  # MQuAKE-style lists: CounterFact has exactly one rewrite
        rw = rw[0]

    def obj(key):
        v = need(rw, key, where)
        return v["str"] if isinstance(v, dict) else v

    req = EditRequest(prompt=need(rw, "prompt", where), subject=need(rw, "subject", where),
                      target_new=obj("target_new"), target_true=obj("target_true"),
                      case_id=rec.get("case_id"), where=where)
    return EvalCase(request=req, paraphrase_prompts=tuple(rec.get("paraphrase_prompts", ())),
                    neighborhood_prompts=tuple(rec.get("neighborhood_prompts", ())),
                    generation_prompts=tuple(rec.get("generation_prompts", ())))


def _easyedit_case(rec: dict, where: str) -> EvalCase:
    req = EditRequest(prompt=need(rec, "prompt", where), subject=need(rec, "subject", where),
                      target_new=need(rec, "target_new", where), target_true=need(rec, "ground_truth", where),
                      case_id=rec.get("case_id"), where=where)
    para = rec.get("rephrase_prompt")
    loc = rec.get("locality_prompt")
    return EvalCase(request=req, paraphrase_prompts=(para,) if para else (),
                    neighborhood_prompts=(loc,) if loc else (),
                    neighborhood_target=rec.get("locality_ground_truth") or None,
                    # EasyEdit's files have no generation prompts: fluency uses the edit's own prompts
                    generation_prompts=tuple(p for p in (req.prompt, para) if p))


def load_counterfact(path, limit: int | None = None) -> list[EvalCase]:
    """Cases from a CounterFact file in either format (detected per record)."""
    records = read_records(path)
    if not records:
        raise FactEditError(f"{path}: no records")
    out = []
    for where, rec in records[: limit or None]:
        if not isinstance(rec, dict):
            raise FactEditError(f"{where}: expected an object, got {type(rec).__name__}")
        out.append(_rome_case(rec, where) if "requested_rewrite" in rec else _easyedit_case(rec, where))
    return out


_SENTENCE_END = re.compile(r"[.!?][\"')\]]?\s")


def is_true_paraphrase(prompt: str, subject: str) -> bool:
    """Whether an EasyEdit CounterFact ``rephrase_prompt`` is one of CounterFact's paraphrase prompts rather than
    a generation prompt. CounterFact builds its paraphrase prompts as a random prefix sentence followed by the
    paraphrase, and its generation prompts without one, so a sentence end before the subject's last mention
    marks a paraphrase (15.8% of counterfact-edit, 16.6% of counterfact-train: the ~16% of specs/hypernetwork.md)."""
    i = prompt.rfind(subject)
    return i > 0 and _SENTENCE_END.search(prompt[:i]) is not None
