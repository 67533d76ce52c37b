"""Benchmarks as a registry: each declares its loader, its probes and its metrics.

A benchmark is registered once under its name (a duplicate raises); the CLI, the evaluation runner and the
tracer look it up by that name, so an unknown name is refused with the list of known ones instead of being
scored as some other benchmark.

- ``load(path, limit, options) -> [EvalCase]``: cases from a file (``options``: benchmark-specific choices,
  e.g. zsRE's target);
- ``probes(case) -> [(group, index, prompt, target)]``: what is scored, teacher-forced, per case;
- ``metrics(raw, pre) -> {name: fraction}``: per-case metrics from the raw scores (and the pre-edit record).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from ..errors import FactEditError
from ..types import EvalCase

Probe = tuple[str, int, str, str]


@dataclass(frozen=True)
class Benchmark:
    name: str
    default_file: str  # relative to the data folder (shared/data)
    load: Callable[[Path, int | None, dict[str, Any]], list[EvalCase]]
    probes: Callable[[EvalCase], list[Probe]]
    metrics: Callable[[dict, dict | None], dict[str, float]]
    description: str = ""


BENCHMARKS: dict[str, Benchmark] = {}


def register_benchmark(bench: Benchmark) -> Benchmark:
    if bench.name in BENCHMARKS and BENCHMARKS[bench.name] is not bench:
        raise FactEditError(f"benchmark '{bench.name}' is already registered")
    BENCHMARKS[bench.name] = bench
    return bench


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise FactEditError(f"unknown benchmark '{name}' (known: {', '.join(sorted(BENCHMARKS))})")
    return BENCHMARKS[name]


def _agreement(post: list[dict], pre: list[dict]) -> float:
    """Mean over probes of the share of teacher-forced argmax tokens the edit left as the unedited model had them."""
    return mean(mean(float(x == y) for x, y in zip(a["argmax"], b["argmax"])) if a["argmax"] else 0.0
                for a, b in zip(post, pre))


def _p(x: dict) -> float:
    import math

    return math.exp(-x["nll"])


# ---- CounterFact: probability comparisons new vs true (specs/evaluation.md §C.1) ----------------------------
def _cf_probes(case: EvalCase) -> list[Probe]:
    out = []
    for n, r in enumerate(case.requests):
        sfx = f"@{n}" if n else ""  # the extra edits of a multi-edit case get their own groups
        for g, prompts in (("rewrite", (r.prompt,)), ("paraphrase", case.paraphrase_prompts if not n else ())):
            for i, p in enumerate(prompts):
                out.append((g + sfx, i, p, r.target_new))
                out.append((g + "_true" + sfx, i, p, r.target_true))
    r = case.request
    true = case.neighborhood_target or r.target_true
    for i, p in enumerate(case.neighborhood_prompts):
        out.append(("neighborhood", i, p, r.target_new))
        out.append(("neighborhood_true", i, p, true))
    return out


def _cf_metrics(rec: dict, pre: dict | None = None) -> dict[str, float]:
    m: dict[str, float] = {}
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
    if pre is not None and true and pre.get("raw", {}).get("neighborhood_true"):
        # locality as agreement with the unedited model (MALMEN's LS, the zsRE locality): the share of the
        # teacher-forced argmax tokens along the true neighbourhood target that the edit left unchanged
        m["neighborhood_agreement"] = _agreement(true, pre["raw"]["neighborhood_true"])
    return m


def _cf_load(path: Path, limit: int | None, options: dict[str, Any]) -> list[EvalCase]:
    from ..data.counterfact import load_counterfact

    return load_counterfact(path, limit)


# ---- zsRE: teacher-forced token accuracy, locality as agreement with the unedited model (§C.2) -------------
def _zsre_probes(case: EvalCase) -> list[Probe]:
    out = [("rewrite" + (f"@{n}" if n else ""), 0, r.prompt, r.target_new) for n, r in enumerate(case.requests)]
    for i, p in enumerate(case.paraphrase_prompts):
        out.append(("paraphrase", i, p, case.request.target_new))
    for i, (p, a) in enumerate(case.locality):
        out.append(("locality", i, p, a))
    return out


def _zsre_metrics(rec: dict, pre: dict | None = None) -> dict[str, float]:
    m: dict[str, float] = {}
    for g, name in (("rewrite", "efficacy"), ("paraphrase", "generalization"), ("locality", "specificity")):
        if rec.get(g):
            m[name] = mean(x["acc"] for x in rec[g])
    if pre is not None and rec.get("locality"):
        m["locality"] = _agreement(rec["locality"], pre["raw"]["locality"])
    return m


def _zsre_load(path: Path, limit: int | None, options: dict[str, Any]) -> list[EvalCase]:
    from ..data.zsre import load_zsre

    return load_zsre(path, limit, target=options.get("zsre_target", "alt"))


register_benchmark(Benchmark("counterfact", "counterfact/counterfact-edit.json.gz", _cf_load, _cf_probes, _cf_metrics,
                             "CounterFact: efficacy / generalisation / specificity by probability comparison"))
register_benchmark(Benchmark("zsre", "zsre/zsre_mend_eval_portability_gpt4.json", _zsre_load, _zsre_probes,
                             _zsre_metrics, "zsRE: token accuracy; locality as agreement with the unedited model"))


# ---- KnowEdit: the field's toolkit's metrics (edit success, portability, locality, fluency) ------------------
def _ke_probes(case: EvalCase) -> list[Probe]:
    out = [("rewrite" + (f"@{n}" if n else ""), 0, r.prompt, r.target_new) for n, r in enumerate(case.requests)]
    for i, p in enumerate(case.paraphrase_prompts):
        out.append(("paraphrase", i, p, case.request.target_new))
    for i, (kind, p, a) in enumerate(case.portability):
        out.append((f"portability:{kind}", i, p, a))
    kinds = case.locality_kinds or ("Relation_Specificity",) * len(case.locality)
    for i, ((p, a), kind) in enumerate(zip(case.locality, kinds)):
        out.append((f"locality:{kind}", i, p, a))
    return out


def _ke_metrics(rec: dict, pre: dict | None = None) -> dict[str, float]:
    """Edit success (efficacy) and generality: teacher-forced token accuracy of the new target; portability: the
    same on each kind's questions, then the mean over the case's kinds; locality: agreement of the post-edit
    argmax tokens with the pre-edit ones on each kind's prompts, then the mean over kinds."""
    m: dict[str, float] = {}
    for g, name in (("rewrite", "efficacy"), ("paraphrase", "generalization")):
        if rec.get(g):
            m[name] = mean(x["acc"] for x in rec[g])
    port = {g.split(":", 1)[1]: mean(x["acc"] for x in v) for g, v in rec.items() if g.startswith("portability:") and v}
    for kind, v in port.items():
        m[f"portability_{kind}"] = v
    if port:
        m["portability"] = mean(port.values())
    if pre is not None:
        loc = {g.split(":", 1)[1]: _agreement(v, pre["raw"][g]) for g, v in rec.items()
               if g.startswith("locality:") and v and pre["raw"].get(g)}
        for kind, v in loc.items():
            m[f"locality_{kind}"] = v
        if loc:
            m["locality"] = mean(loc.values())
    return m


def _ke_load(path: Path, limit: int | None, options: dict[str, Any]) -> list[EvalCase]:
    from ..data.knowedit import load_knowedit

    return load_knowedit(path, limit)


for _name, _file, _what in (
        ("wiki_counterfact", "knowedit/wiki_counterfact/train_cf.json.gz", "WikiData_counterfact (train split: the test split is not available)"),
        ("wiki_recent", "knowedit/wiki_recent/recent_train.json.gz", "WikiData_recent (train split: the test split is not available)"),
        ("wikibio", "knowedit/WikiBio/wikibio-test-all.json", "WikiBio test"),
        ("zsre", "zsre/ZsRE-test-all.json", "ZsRE test")):
    register_benchmark(Benchmark(f"knowedit-{_name}", _file, _ke_load, _ke_probes, _ke_metrics,
                                 f"KnowEdit {_what}: edit success, portability, locality (the toolkit's metrics)"))
