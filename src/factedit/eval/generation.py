"""The generation protocol of the massive-editing papers (MeG, and how MALMEN/MEMIT/AlphaEdit are compared there),
available to every method and benchmark with ``factedit eval ... --protocol generation``.

Every prompt is put in the model's question template (``{q}``: the prompt; per model family in
``presets/generation/<family>[-<n>l].yaml``, or ``--set eval.template=...``) and the model answers greedily, up to
``eval.max_new_tokens`` new tokens, stopping at its end-of-sequence token. The answer is cut at the first newline,
stripped of white space and one trailing ".", and compared case-insensitively:

- efficacy (reliability): the answer to the edit prompt equals the new target;
- generalization (generality): the same on the paraphrase prompts;
- locality: the answer to each locality prompt (CounterFact's neighbourhood prompts, zsRE's and KnowEdit's locality
  questions) equals the unedited model's own answer to it (from the pre-edit record);
- beside them, ``efficacy_acc`` / ``generalization_acc``: the teacher-forced token accuracy of the target after the
  template-wrapped prompt.
"""

from __future__ import annotations

from statistics import mean

from ..config import load_preset
from ..lm.generate import greedy_answers, normalize_answer
from ..lm.load import LM
from ..types import EvalCase
from .scoring import score_targets

DEFAULT_TEMPLATE = "{q}"


def question_template(lm: LM) -> str:
    """The question template of ``lm``'s family (``presets/generation``), else the bare prompt."""
    data, _ = load_preset("generation", lm.arch.family, lm.n_layers)
    return str(data.get("template", DEFAULT_TEMPLATE))


def resolve_template(lm: LM, template: str) -> str:
    return question_template(lm) if template == "auto" else template


def wrap(template: str, prompt: str) -> str:
    return template.replace("{q}", prompt)


def _probes(case: EvalCase) -> dict[str, list[tuple[str, str | None]]]:
    """group -> [(prompt, target or None)] of the generation protocol."""
    target = case.request.target_new
    loc = list(case.neighborhood_prompts) or [p for p, _ in case.locality]
    return {"rewrite": [(case.request.prompt, target)],
            "paraphrase": [(p, target) for p in case.paraphrase_prompts],
            "locality": [(p, None) for p in loc]}


def score_generation(lm: LM, cases: list[EvalCase], template: str, max_new_tokens: int = 20,
                     batch_size: int = 32) -> list[dict]:
    """One raw record per case: per group, the greedy answers ("answers") and, where there is a target, the
    teacher-forced scores ({nll, acc, argmax})."""
    flat = [(ci, g, wrap(template, p), t) for ci, c in enumerate(cases) for g, v in _probes(c).items() for p, t in v]
    uniq = sorted({f[2] for f in flat}, key=len)
    ans = dict(zip(uniq, greedy_answers(lm, uniq, max_new_tokens=max_new_tokens, batch_size=batch_size)))
    tf = [f for f in flat if f[3] is not None]
    scores = score_targets(lm, [f[2] for f in tf], [f[3] for f in tf], batch_size=batch_size)
    recs: list[dict] = [{} for _ in cases]
    for ci, g, p, _t in flat:
        recs[ci].setdefault("answers", {}).setdefault(g, []).append(ans[p])
    for (ci, g, _p, _t), s in zip(tf, scores):
        recs[ci].setdefault(g, []).append({"nll": round(s.nll, 6), "acc": round(s.token_acc, 6), "argmax": s.argmax})
    targets = [{g: [t for _, t in v] for g, v in _probes(c).items()} for c in cases]
    for rec, t in zip(recs, targets):
        rec["targets"] = {g: v for g, v in t.items() if g != "locality"}
    return recs


def generation_metrics(rec: dict, pre: dict | None = None) -> dict[str, float]:
    m: dict[str, float] = {}
    ans, tgt = rec.get("answers", {}), rec.get("targets", {})
    for g, name in (("rewrite", "efficacy"), ("paraphrase", "generalization")):
        if ans.get(g):
            m[name] = mean(float(normalize_answer(a) == normalize_answer(t)) for a, t in zip(ans[g], tgt[g]))
        if rec.get(g):
            m[name + "_acc"] = mean(x["acc"] for x in rec[g])
    before = ((pre or {}).get("raw") or {}).get("answers", {}).get("locality")
    if ans.get("locality") and before:
        m["locality"] = mean(float(normalize_answer(a) == normalize_answer(b)) for a, b in zip(ans["locality"], before))
    return m
