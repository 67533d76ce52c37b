"""KnowEdit (Zhang et al., 2024) in the field's toolkit's record format: WikiData_counterfact, WikiData_recent,
ZsRE (``prompt``, ``subject``, ``target_new``, optional ``rephrase_prompt``, ``portability`` and ``locality`` as
{kind: [{prompt, ground_truth}]}) and WikiBio (``text``, ``labels``, ``concept``, ``locality``).

A ``ground_truth`` may be a string, a list of strings or a list of alias lists (WikiData_recent): the first alias of
the first entry is the answer scored, as the toolkit does. Each case also carries its edit prompt as its generation
prompt (fluency is the n-gram entropy of what the edited model writes after it).
"""

from __future__ import annotations

from ..errors import FactEditError
from ..types import EditRequest, EvalCase
from .io import need, read_records


def _answer(v, where: str, empty_ok: bool = False) -> str:
    while isinstance(v, list):
        if not v:
            if empty_ok:
                return ""
            raise FactEditError(f"{where}: empty ground_truth")
        v = v[0]
    if not isinstance(v, str):
        raise FactEditError(f"{where}: ground_truth must be a string or a list of strings, got {type(v).__name__}")
    return v


def _kinds(rec: dict, key: str, where: str) -> list[tuple[str, str, str]]:
    """[(kind, prompt, answer)] of a {kind: [{prompt, ground_truth}]} field (missing or empty: none)."""
    field = rec.get(key) or {}
    if not isinstance(field, dict):
        raise FactEditError(f"{where}: field '{key}' must be an object of kinds, got {type(field).__name__}")
    out = []
    for kind, items in field.items():
        if not isinstance(items, list):
            raise FactEditError(f"{where}: {key}.{kind} must be a list")
        for j, it in enumerate(items):
            w = f"{where} {key}.{kind}[{j}]"
            prompt = need(it, "prompt", w)
            if isinstance(prompt, list):  # some files keep multi-hop prompts as lists: the first is the question
                prompt = _answer(prompt, w)
            answer = _answer(need(it, "ground_truth", w), w, empty_ok=True)
            if isinstance(prompt, str) and prompt.strip() and answer.strip():
                out.append((kind, prompt, answer))  # (a few upstream probes have an empty answer: nothing to score)
    return out


def _case(rec: dict, where: str, case_id) -> EvalCase:
    if not isinstance(rec, dict):
        raise FactEditError(f"{where}: expected an object, got {type(rec).__name__}")
    if "text" in rec and "labels" in rec:  # WikiBio: insert the continuation sentence after the passage
        prompt, subject, target = need(rec, "text", where), need(rec, "concept", where), need(rec, "labels", where)
        target_true = None
    else:
        prompt, subject = need(rec, "prompt", where), need(rec, "subject", where)
        target = need(rec, "target_new", where)
        gt = rec.get("ground_truth")
        target_true = _answer(gt, where) if gt not in (None, [], "") else None
        if target_true is not None and target_true.strip() == str(target).strip():
            target_true = None  # a few records restate the true object as the new one: no contrast to score
    req = EditRequest(prompt=prompt, subject=subject, target_new=target, target_true=target_true, case_id=case_id,
                      where=where)
    locs = _kinds(rec, "locality", where)
    para = rec.get("rephrase_prompt")
    return EvalCase(request=req, paraphrase_prompts=(para,) if para else (),
                    locality=tuple((p, a) for _, p, a in locs), locality_kinds=tuple(k for k, _, _ in locs),
                    portability=tuple(_kinds(rec, "portability", where)), generation_prompts=(req.prompt,))


def load_knowedit(path, limit: int | None = None) -> list[EvalCase]:
    """Cases from a KnowEdit file (any of its four formats), the first ``limit``."""
    records = read_records(path)
    if not records:
        raise FactEditError(f"{path}: no records")
    return [_case(rec, where, rec.get("case_id", i) if isinstance(rec, dict) else i)
            for i, (where, rec) in enumerate(records[: limit or None])]


def locality_pool(path, start: int = 0) -> list[tuple[str, str]]:
    """Unrelated (prompt, answer) pairs for a locality loss, from the records of ``path`` from index ``start`` on:
    CounterFact (``locality_prompt``/``locality_ground_truth``), MEND zsRE (``loc``/``loc_ans``) or KnowEdit
    (``locality``) records. Training code takes them from a training split, never from the evaluated cases."""
    out = []
    for where, rec in read_records(path)[start:]:
        if not isinstance(rec, dict):
            raise FactEditError(f"{where}: expected an object, got {type(rec).__name__}")
        if "locality_prompt" in rec:
            out.append((need(rec, "locality_prompt", where), _answer(need(rec, "locality_ground_truth", where), where)))
        elif "loc" in rec:
            out.append((need(rec, "loc", where) + "?", _answer(need(rec, "loc_ans", where), where)))
        elif "locality" in rec:
            out.extend((p, a) for _, p, a in _kinds(rec, "locality", where))
        else:
            raise FactEditError(f"{where}: no locality prompt (locality_prompt, loc or locality)")
    if not out:
        raise FactEditError(f"{path}: no locality prompts from record {start} on")
    return [(p, a) for p, a in out if p.strip() and a.strip()]
