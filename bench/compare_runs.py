"""Paired comparison of finished `factedit eval` runs on the same records.

    python bench/compare_runs.py RUN_A RUN_B [RUN_C ...] [--metrics efficacy,specificity] [--out FILE]

Each RUN is a run folder (its `cases.jsonl`), or several run folders joined by commas, whose records are
pooled (runs of one method on disjoint samples, e.g. `runs/nse-b,runs/nse-c`; they must not share a
case_id). The runs are compared on the records they all hold, by
`case_id`. For every metric the script prints each run's post-edit mean (percent) and, for every pair of
runs, how many records are better in one than the other and the exact two-sided McNemar (sign) p-value
over those discordant records. CounterFact's efficacy / generalisation / specificity are 0-1 per record
(EasyEdit's files: one prompt of each kind per record), which is what the test assumes; other metrics are
compared by sign of the per-record difference.
"""

import argparse
import json
import math
from itertools import combinations
from pathlib import Path

from factedit.fsutil import write_json


def load_cases(run: Path) -> dict[int, dict]:
    # Strict on purpose, unlike fsutil.read_jsonl (the harness's resume reader, which drops and truncates a
    # torn last line): a comparison must not silently lose records or modify the run folder it reads.
    path = run / "cases.jsonl"
    if not path.exists():
        raise SystemExit(f"{path}: not found (is {run} a finished `factedit eval` run?)")
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
                out[int(rec["case_id"])] = rec["post"]
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{path}:{n}: not a case record ({e})") from None
    if not out:
        raise SystemExit(f"{path}: no records")
    return out


def load_pooled(spec: str) -> dict[int, dict]:
    """The records of one run folder, or of several joined by commas (disjoint samples of one method)."""
    out: dict[int, dict] = {}
    seen: dict[int, str] = {}
    for part in [x for x in spec.split(",") if x]:
        for cid, post in load_cases(Path(part)).items():
            if cid in out:
                raise SystemExit(f"{spec}: case_id {cid} is in both {seen[cid]} and {part}; pool only disjoint samples")
            out[cid], seen[cid] = post, part
    if not out:
        raise SystemExit(f"{spec!r}: no run folder given")
    return out


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial p-value for `wins` against `losses` under p = 1/2."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, j) for j in range(k + 1)) / 2**n)


def compare(runs: dict[str, dict[int, dict]], metrics: list[str]) -> dict:
    ids = sorted(set.intersection(*(set(r) for r in runs.values())))
    if not ids:
        raise SystemExit("the runs share no records")
    res = {"n_records": len(ids), "means": {}, "pairs": []}
    for name, r in runs.items():
        missing = [m for m in metrics if m not in r[ids[0]]]
        if missing:
            raise SystemExit(f"{name}: no metric {missing} in its records")
        res["means"][name] = {m: round(100 * sum(r[i][m] for i in ids) / len(ids), 2) for m in metrics}
    for a, b in combinations(runs, 2):
        for m in metrics:
            wins = sum(1 for i in ids if runs[a][i][m] > runs[b][i][m])
            losses = sum(1 for i in ids if runs[a][i][m] < runs[b][i][m])
            res["pairs"].append({"a": a, "b": b, "metric": m, "a_better": wins, "b_better": losses,
                                 "p_two_sided": sign_test(wins, losses)})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders; join several with commas to pool their records")
    ap.add_argument("--metrics", default="efficacy,generalization,specificity")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if len(args.runs) < 2:
        raise SystemExit("give at least two run folders")
    runs = {r: load_pooled(r) for r in args.runs}
    res = compare(runs, [m.strip() for m in args.metrics.split(",") if m.strip()])
    print(f"{res['n_records']} records in common")
    for n, ms in res["means"].items():
        print(f"  {n}: " + ", ".join(f"{m} {v}" for m, v in ms.items()))
    for p in res["pairs"]:
        print(f"  {p['metric']}: {p['a']} better on {p['a_better']}, {p['b']} better on {p['b_better']}, "
              f"p = {p['p_two_sided']:.2g}")
    if args.out:
        write_json(args.out, res)


if __name__ == "__main__":
    main()
