"""Hyper-parameter / layer sweep on the embedded model (the tool behind the SmolLM2 presets).

    python bench/sweep.py METHOD '{"key": [values], ...}' [--n 40] [--out bench/results/sweep.json]

Each grid point edits the first N CounterFact-edit records in one batch and scores efficacy,
generalisation and specificity (pre-edit figures once, for reference). Layer windows are given as
strings: '{"layers": ["2-6", "3-7", "6-10"]}'. Results are appended to --out as JSON Lines.
"""

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import torch

from factedit import get_editor
from factedit.data import default_bench_file, load_counterfact
from factedit.data.paths import default_data_dir, general_text
from factedit.eval.metrics import aggregate, score_cases
from factedit.eval.scoring import perplexity
from factedit.lm.load import load_lm


def scores(lm, cases, text=None, ppl_tokens=0, groups=()):
    """Efficacy / generalisation / specificity of ``cases`` (and WikiText-2 perplexity); with ``groups`` (the
    sizes of consecutive runs of ``cases``), also each run's efficacy, from the same per-case scores."""
    recs = [{k: v for k, v in r.items() if k != "raw"} for r in score_cases(lm, cases, "counterfact")]
    m = aggregate(recs)
    out = {k: m[k] for k in ("efficacy", "generalization", "specificity")}
    if groups:
        ends = list(itertools.accumulate(groups))
        out["efficacy_by_group"] = [aggregate(recs[e - g : e])["efficacy"] for g, e in zip(groups, ends)]
    if ppl_tokens and text:
        out["perplexity"] = round(perplexity(lm, text, ppl_tokens), 4)  # WikiText-2 test
    return out


def emit(rec: dict, out: str | None) -> None:
    """Print one result record and append it to the JSON Lines file ``out`` (if given)."""
    print(json.dumps(rec), flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")


def z_summary(patch, stop: float):
    """Mean z* steps / final loss / ‖δ‖÷‖h‖ and the phase timings of a locate-family patch (else {})."""
    z = patch.meta.get("z") if hasattr(patch, "meta") else None
    out = {"phase_s": patch.meta["phase_s"]} if hasattr(patch, "meta") and "phase_s" in patch.meta else {}
    if z:
        n = len(z)
        out["z"] = {"steps": round(sum(i["steps"] + 1 for i in z) / n, 2), "loss": round(sum(i["loss"] for i in z) / n, 4),
                    "delta_ratio": round(sum(i["delta_norm"] / max(i["init_norm"], 1e-8) for i in z) / n, 3),
                    "stopped": round(sum(i["loss"] < stop for i in z) / n, 3)}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("method")
    ap.add_argument("grid", help="JSON object: key -> list of values")
    ap.add_argument("--model", default="smollm2-135m", help="embedded model name or a local HF folder")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--ppl-tokens", type=int, default=0, help="also WikiText-2 test perplexity on this many tokens")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lm = load_lm(args.model)
    cases = load_counterfact(default_bench_file("counterfact"), args.n)
    grid = json.loads(args.grid)
    text = general_text(default_data_dir()) if args.ppl_tokens else None
    pre = scores(lm, cases, text, args.ppl_tokens)
    print("pre", pre, flush=True)
    for vals in itertools.product(*grid.values()):
        ov = dict(zip(grid, vals))
        ed = get_editor(args.method, lm, **ov)
        t = time.time()
        p = ed.compute(lm, [c.request for c in cases])
        dt = time.time() - t
        with p.apply(lm):
            post = scores(lm, cases, text, args.ppl_tokens)
        rec = {"method": args.method, "model": lm.name, "overrides": ov, "n": args.n, "pre": pre, "post": post,
               "s_per_fact": round(dt / args.n, 2), **z_summary(p, getattr(ed.config, "early_stop_loss", 0.0)), "threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
               "torch": torch.__version__, "machine": platform.machine()}
        emit(rec, args.out)


if __name__ == "__main__":
    main()
