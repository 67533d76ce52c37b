"""Sweep the closed-form step of MEMIT / AlphaEdit / NSE with z* computed once.

    python bench/solve_sweep.py METHOD '{"key": [values], ...}' [--n 200] [--rounds-of 100] [--out FILE]

z* (the expensive part) depends only on the z* settings and the unedited model, not on the solve's
hyper-parameters (λ, the null-space threshold, L2, NSE's neuron threshold) nor on the layers below the
last edited one. So it is computed once for the first N CounterFact-edit records, in one batch, with the
preset's z* settings (kept in the z* store, ``<cache>/zstar``, which `factedit eval` runs on the same
weights share), and every grid point only re-runs
the keys, the residual spreading and the solves. --base sets z* settings (and others) for all points. Each point reports efficacy / generalisation /
specificity on the N records and the WikiText-2 test perplexity (first --ppl-tokens tokens), against
the unedited model's figures. Grid keys that change z* (its site, steps, clamp ...) are refused.
With --rounds-of K (NSE only) the N facts are edited sequentially in rounds of K, each round committed
before the next, exactly as `factedit eval --mode sequential` does: NSE's z* always comes from the
original weights, so the cached z* is the one the sequential run would compute. For MEMIT and
AlphaEdit, --approx-z allows rounds with the unedited model's z* in every round (an approximation
for ranking settings, recorded as "approx_z" in the output).
Results are appended to --out as JSON Lines.
"""

import argparse
import itertools
import json
import platform
import time

import torch
from sweep import emit, scores  # bench/sweep.py, beside this script

from factedit import get_editor
from factedit.data import default_bench_file, load_counterfact
from factedit.data.paths import default_data_dir, general_text
from factedit.lm.load import load_lm
from factedit.methods.base import frozen
from factedit.methods.locate.base import z_settings


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("method", choices=["memit", "alphaedit", "nse"])
    ap.add_argument("grid", help="JSON object: key -> list of values")
    ap.add_argument("--model", default="smollm2-135m", help="embedded model name or a local HF folder")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--base", default="{}",
                    help="JSON object of settings applied to every point, z* settings included (e.g. a smaller "
                         "clamp); z* is computed once for them and cached")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--z-batch", type=int, default=32, help="requests per z* batch (does not change z*)")
    ap.add_argument("--rounds-of", type=int, default=0,
                    help="edit sequentially in rounds of this size (NSE only: its z* always comes from the original "
                         "weights, so it does not depend on earlier rounds)")
    ap.add_argument("--approx-z", action="store_true",
                    help="allow --rounds-of for memit/alphaedit with z* from the unedited model in every round "
                         "(the real run recomputes z* on the edited model): a cheap proxy for ranking settings")
    ap.add_argument("--score-every", type=int, default=1,
                    help="score ES/PS/NS on every k-th of the N edited records (all N are edited); perplexity is "
                         "unaffected")
    ap.add_argument("--by-round", action="store_true",
                    help="with --rounds-of: also report each round's efficacy on its scored records, right after the "
                         "round and at the end of the stream (what later rounds took back)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.rounds_of and args.method != "nse" and not args.approx_z:
        raise SystemExit("--rounds-of needs nse: MEMIT's and AlphaEdit's z* depend on the earlier rounds' edits "
                         "(--approx-z uses the unedited model's z* in every round, an approximation)")
    lm = load_lm(args.model)
    cases = load_counterfact(default_bench_file("counterfact"), args.n)
    reqs = [c.request for c in cases]
    text = general_text(default_data_dir())
    grid = json.loads(args.grid)
    over = json.loads(args.base)
    base = get_editor(args.method, lm, z_batch=args.z_batch, **over)
    zset = z_settings(base.config, lm.device)
    site = base.loss_layer_z(lm)
    # the z* store (zstore.ZStore) keeps each request's z* for these weights and settings: computed
    # once here (or by an earlier `factedit eval` run on the same weights), then read back
    t = time.time()
    with frozen(lm), torch.no_grad():
        zs, infos = base._z(lm, reqs)
    print(f"z* for {args.n} requests: {time.time() - t:.0f} s "
          f"({sum(1 for i in infos if i.get('stored'))} read from the store)", flush=True)
    scored = cases[:: max(1, args.score_every)]
    pre = scores(lm, scored, text, args.ppl_tokens)
    print("pre", pre, flush=True)
    for vals in itertools.product(*grid.values()):
        ov = dict(zip(grid, vals))
        ed = get_editor(args.method, lm, z_batch=args.z_batch, **{**over, **ov})
        if z_settings(ed.config, lm.device) != zset or ed.loss_layer_z(lm) != site:
            raise SystemExit(f"{ov} changes z* (its settings or site); sweep those with bench/sweep.py")
        k = args.rounds_of or args.n
        handles, metas, at_edit = [], [], []
        every = max(1, args.score_every)
        rounds = ([[cases[i] for i in range(s, min(s + k, args.n)) if i % every == 0] for s in range(0, args.n, k)]
                  if args.by_round else [])
        t = time.time()
        try:
            for s in range(0, args.n, k):
                # the cached z* (same settings, same unedited model; NSE rewinds to it in every round)
                ed._z = lambda _lm, _reqs, s=s, k=k: (zs[s : s + k], infos[s : s + k])
                p = ed.compute(lm, reqs[s : s + k])
                handles.append(p.apply(lm))
                ed.commit(p)
                metas.append(p.meta)
                if rounds:
                    at_edit.append(scores(lm, rounds[len(metas) - 1])["efficacy"])
            dt = time.time() - t  # includes the per-round scoring with --by-round
            post = scores(lm, scored, text, args.ppl_tokens, groups=[len(r) for r in rounds])
            at_end = post.pop("efficacy_by_group", [])
        finally:
            for h in reversed(handles):
                h.revert()
        phases = {}
        for m in metas:
            for ph, v in (m.get("phase_s") or {}).items():
                phases[ph] = round(phases.get(ph, 0.0) + v, 2)
        rec = {"method": args.method, "model": lm.name, "base": over, "overrides": ov, "n": args.n, "rounds_of": k,
               "scored": len(scored), "ppl_tokens": args.ppl_tokens,
               "approx_z": bool(args.approx_z and args.rounds_of and args.method != "nse"), "pre": pre, "post": post,
               "ppl_ratio": round(post["perplexity"] / pre["perplexity"], 4), "solve_s": round(dt, 1),
               "phase_s": phases, "passes": [m.get("passes") for m in metas], "threads": torch.get_num_threads(),
               "torch": torch.__version__, "machine": platform.machine()}
        if rounds:
            rec["efficacy_by_round"] = {"after_round": at_edit, "at_end": at_end}
        emit(rec, args.out)


if __name__ == "__main__":
    main()
