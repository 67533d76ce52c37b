"""Hyper-parameter sweep: python bench/sweep.py METHOD '{"key": [values], ...}' (first 40 CounterFact-edit records, batch)."""
import sys, time, itertools, json
from factedit.lm.load import load_lm
from factedit.data import default_bench_file, load_counterfact
from factedit.eval.metrics import score_cases, aggregate
from factedit import get_editor
lm = load_lm()
cases = load_counterfact(default_bench_file("counterfact"), 40)
method = sys.argv[1]; grid = json.loads(sys.argv[2])
keys = list(grid)
for vals in itertools.product(*grid.values()):
    ov = dict(zip(keys, vals))
    ed = get_editor(method, lm, **ov)
    t = time.time(); p = ed.compute(lm, [c.request for c in cases]); dt = time.time() - t
    with p.apply(lm):
        m = aggregate([{k: v for k, v in r.items() if k != 'raw'} for r in score_cases(lm, cases, "counterfact")])
    print(ov, f"{dt:.1f}s", {k: m[k] for k in ("efficacy", "generalization", "specificity")}, flush=True)
