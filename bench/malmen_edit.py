"""MALMEN / MEND editing speed: N CounterFact facts in one call with a trained editor.

An edit is one forward and backward of the unedited model over the facts (the capture of keys and value
gradients, in LM mini-batches), a hyper-network pass over the captured rows, and one solve per edited module.
This script times `editor.compute` on the first N counterfact-edit records (median of R repeats), and the capture
alone, and records the rows, the machine, the threads and the versions. Target (issue 22): 1,000 facts in under
two minutes on a 2-core CPU.

    python bench/malmen_edit.py --editor runs/malmen-cf --n 1000 --repeats 3 --out bench/results/malmen_edit.json
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zstar_speed import cpu_name  # noqa: E402  (bench/zstar_speed.py, beside this script)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--editor", required=True, help="a trained MALMEN or MEND editor folder")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", help="counterfact-edit file (default: shared/data beside the checkout)")
    ap.add_argument("--out", default="bench/results/malmen_edit.json")
    args = ap.parse_args()

    import json

    from factedit.data import default_bench_file, load_counterfact
    from factedit.fsutil import write_json
    from factedit.lm.load import load_lm
    from factedit.registry import get_editor_class
    from factedit.version import __version__

    method = json.loads((Path(args.editor) / "editor.json").read_text())["method"]
    lm = load_lm("smollm2-135m")
    ed = get_editor_class(method).from_pretrained(args.editor, lm)
    reqs = [c.request for c in load_counterfact(Path(args.data) if args.data else default_bench_file("counterfact"),
                                                args.n)]
    times, caps = [], []
    rows = 0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        cap = ed._capture(lm, reqs)
        caps.append(time.perf_counter() - t0)
        rows = cap.n_rows
        del cap
        t0 = time.perf_counter()
        patch = ed.compute(lm, reqs)
        times.append(time.perf_counter() - t0)
    n_params = sum(d.materialise().numel() for d in patch.deltas.values())
    out = {
        "method": method, "editor": str(args.editor), "facts": len(reqs), "rows": rows,
        "edit_s": times, "edit_s_median": statistics.median(times), "capture_s": caps,
        "capture_s_median": statistics.median(caps), "per_fact_ms": 1000 * statistics.median(times) / len(reqs),
        "patch_params": n_params, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "factedit": __version__},
    }
    write_json(Path(args.out), out)
    print(json.dumps({k: v for k, v in out.items() if k not in ("edit_s", "capture_s")}, indent=1))


if __name__ == "__main__":
    main()
