"""CounterFact scoring speed: one row per (prompt, target) against all targets of a prompt in one row.

Scores the probes of the first N CounterFact-edit records (rewrite, paraphrase and neighbourhood
prompts, each for the new and the true target) on the embedded model both ways, alternating, and
reports seconds per record and the largest difference between the two paths' scores.

    python bench/eval_speed.py --n 256 --repeats 2 --out bench/results/eval_speed.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zstar_speed import cpu_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=256, help="CounterFact-edit records")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="bench/results/eval_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from factedit.data import default_bench_file, load_counterfact
    from factedit.eval.benches import get_benchmark
    from factedit.eval.scoring import score_targets
    from factedit.fsutil import write_json
    from factedit.lm.load import load_lm

    lm = load_lm(args.model)
    cases = load_counterfact(default_bench_file("counterfact"), args.n)
    flat = [p for c in cases for p in get_benchmark("counterfact").probes(c)]
    prompts, targets = [f[2] for f in flat], [f[3] for f in flat]
    score_targets(lm, prompts[:64], targets[:64], pack=False)  # warm-up
    times: dict[str, list[float]] = {"separate_rows": [], "packed": []}
    scores = {}
    for _ in range(args.repeats):
        for name, pack in (("separate_rows", False), ("packed", True)):
            t = time.perf_counter()
            scores[name] = score_targets(lm, prompts, targets, batch_size=args.batch_size, pack=pack)
            times[name].append((time.perf_counter() - t) / len(cases))
            print(name, f"{times[name][-1]:.4f} s/record", flush=True)
    a, b = scores["separate_rows"], scores["packed"]
    res = {
        "bench": "eval_speed", "model": lm.name, "records": len(cases), "pairs": len(flat),
        "distinct_prompts": len(set(prompts)), "batch_size_rows": args.batch_size, "threads": torch.get_num_threads(),
        "s_per_record": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "speedup_best": round(min(times["separate_rows"]) / min(times["packed"]), 2),
        "max_abs_nll_diff": max(abs(x.nll - y.nll) for x, y in zip(a, b)),
        "argmax_equal": all(x.argmax == y.argmax for x, y in zip(a, b)),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": " ".join(["python"] + sys.argv),
    }
    write_json(Path(args.out), res)
    print(res)


if __name__ == "__main__":
    main()
