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
from .benches import get_benchmark
from .scoring import score_targets

HEADLINE = ("efficacy", "generalization", "specificity", "locality", "portability")  # the per-round and summary lines


def score_cases(lm: LM, cases: list[EvalCase], bench: str, batch_size: int = 32, desc: str | None = None,
                protocol: str = "bench", template: str = "{q}", max_new_tokens: int = 20) -> list[dict]:
    """One raw record per case: for each probe group, the list of {nll, acc, argmax} (``protocol="generation"``:
    greedy answers and teacher-forced scores after the question template, ``eval.generation``)."""
    if protocol == "generation":
        from .generation import generation_metrics, score_generation

        recs = score_generation(lm, cases, template, max_new_tokens, batch_size)
        return [generation_metrics(rec) | {"raw": rec} for rec in recs]
    probes = get_benchmark(bench).probes
    flat = [(ci, g, i, p, t) for ci, c in enumerate(cases) for g, i, p, t in probes(c)]
    scores = score_targets(lm, [f[3] for f in flat], [f[4] for f in flat], batch_size=batch_size, desc=desc)
    recs: list[dict] = [{} for _ in cases]
    for (ci, g, _i, _p, _t), s in zip(flat, scores):
        recs[ci].setdefault(g, []).append({"nll": round(s.nll, 6), "acc": round(s.token_acc, 6), "argmax": s.argmax})
    return [case_metrics(rec, bench) | {"raw": rec} for rec in recs]


def case_metrics(rec: dict, bench: str, pre: dict | None = None, protocol: str = "bench") -> dict:
    """Per-case metrics (fractions in [0, 1]) from a raw record; ``pre`` adds pre/post agreement."""
    if protocol == "generation":
        from .generation import generation_metrics

        return generation_metrics(rec, pre)
    return get_benchmark(bench).metrics(rec, pre)


def aggregate(per_case: list[dict]) -> dict[str, float]:
    """Mean of each per-case metric over the cases that have it, in percent; plus the harmonic-mean
    Score of efficacy, generalisation and specificity (MEMIT's S)."""
    keys = sorted({k for m in per_case for k in m if k != "raw"})
    out = {k: round(100 * mean(m[k] for m in per_case if k in m), 2) for k in keys}
    parts = [out.get(k) for k in ("efficacy", "generalization", "specificity")]
    if all(p is not None for p in parts):
        out["score"] = round(len(parts) / sum(1 / max(p, 1e-9) for p in parts), 2)
    return out
