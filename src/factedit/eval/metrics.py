"""Per-case records and their aggregation (specs/evaluation.md §C.1, §C.2).

CounterFact: probability comparisons new-vs-true (ES/PS/NS), their magnitudes (EM/PM/NM) and the
all-tokens argmax accuracies. zsRE: teacher-forced token accuracy (MEMIT protocol) on rewrite,
rephrase and locality prompts, plus locality as agreement with the pre-edit model's argmax tokens
(EasyEdit protocol). Everything reported in percent.
"""

from __future__ import annotations

from statistics import mean

from ..lm.load import LM
from ..types import EvalCase
from .scoring import score_targets

BENCHES = ("counterfact", "zsre")
HEADLINE = ("efficacy", "generalization", "specificity", "locality")  # the per-round and summary lines


def _probes(case: EvalCase, bench: str) -> list[tuple[str, int, str, str]]:
    """(group, index, prompt, target) for one case."""
    r = case.request
    out = []
    if bench == "counterfact":
        for g, prompts in (("rewrite", (r.prompt,)), ("paraphrase", case.paraphrase_prompts)):
            for i, p in enumerate(prompts):
                out.append((g, i, p, r.target_new))
                out.append((g + "_true", i, p, r.target_true))
        true = case.neighborhood_target or r.target_true
        for i, p in enumerate(case.neighborhood_prompts):
            out.append(("neighborhood", i, p, r.target_new))
            out.append(("neighborhood_true", i, p, true))
    else:
        out.append(("rewrite", 0, r.prompt, r.target_new))
        for i, p in enumerate(case.paraphrase_prompts):
            out.append(("paraphrase", i, p, r.target_new))
        for i, (p, a) in enumerate(case.locality):
            out.append(("locality", i, p, a))
    return out


def score_cases(lm: LM, cases: list[EvalCase], bench: str, batch_size: int = 32, desc: str | None = None) -> list[dict]:
    """One raw record per case: for each probe group, the list of {nll, acc, argmax}."""
    flat = [(ci, g, i, p, t) for ci, c in enumerate(cases) for g, i, p, t in _probes(c, bench)]
    scores = score_targets(lm, [f[3] for f in flat], [f[4] for f in flat], batch_size=batch_size, desc=desc)
    recs: list[dict] = [{} for _ in cases]
    for (ci, g, _i, _p, _t), s in zip(flat, scores):
        recs[ci].setdefault(g, []).append({"nll": round(s.nll, 6), "acc": round(s.token_acc, 6), "argmax": s.argmax})
    return [case_metrics(rec, bench) | {"raw": rec} for rec in recs]


def _p(x: dict) -> float:
    import math

    return math.exp(-x["nll"])


def case_metrics(rec: dict, bench: str, pre: dict | None = None) -> dict:
    """Per-case metrics (fractions in [0, 1]) from a raw record; ``pre`` adds pre/post agreement."""
    m: dict[str, float] = {}
    if bench == "counterfact":
        for g, name in (("rewrite", "efficacy"), ("paraphrase", "generalization")):
            new, true = rec.get(g, []), rec.get(g + "_true", [])
            if new:
                m[name] = mean(float(n["nll"] < t["nll"]) for n, t in zip(new, true))
                m[name + "_magnitude"] = mean(_p(n) - _p(t) for n, t in zip(new, true))
                m[name + "_acc"] = mean(float(n["acc"] == 1.0) for n in new)
        new, true = rec.get("neighborhood", []), rec.get("neighborhood_true", [])
        if new:
            m["specificity"] = mean(float(t["nll"] < n["nll"]) for n, t in zip(new, true))
            m["specificity_magnitude"] = mean(_p(t) - _p(n) for n, t in zip(new, true))
            m["specificity_acc"] = mean(float(t["acc"] == 1.0) for t in true)
    else:
        for g, name in (("rewrite", "efficacy"), ("paraphrase", "generalization"), ("locality", "specificity")):
            if rec.get(g):
                m[name] = mean(x["acc"] for x in rec[g])
        if pre is not None and rec.get("locality"):
            agree = []
            for post_x, pre_x in zip(rec["locality"], pre["raw"]["locality"]):
                a, b = post_x["argmax"], pre_x["argmax"]
                agree.append(mean(float(x == y) for x, y in zip(a, b)) if a else 0.0)
            m["locality"] = mean(agree)
    return m


def aggregate(per_case: list[dict]) -> dict[str, float]:
    """Mean of each per-case metric over the cases that have it, in percent; plus the harmonic-mean
    Score of efficacy, generalisation and specificity (MEMIT's S)."""
    keys = sorted({k for m in per_case for k in m if k != "raw"})
    out = {k: round(100 * mean(m[k] for m in per_case if k in m), 2) for k in keys}
    parts = [out.get(k) for k in ("efficacy", "generalization", "specificity")]
    if all(p is not None for p in parts):
        out["score"] = round(len(parts) / sum(1 / max(p, 1e-9) for p in parts), 2)
    return out
