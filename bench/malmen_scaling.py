"""MALMEN's scaling claim at this scale: the same facts edited at m facts per call, by several trained editors.

For every editor (NAME=DIR: MALMEN, MEND, their untrained counterparts, ...) and every m, the first N CounterFact-edit
facts are edited in calls of m facts, each call on the unedited model and reverted after its facts are scored
(`factedit eval --mode batch --batch-size m`). The unedited model's records are computed once and shared
(`--pre-from`). Per (editor, m): efficacy and generalisation (probability comparison and exact-match token
accuracy), specificity (the neighbourhood score) and neighbourhood agreement with the unedited model, each with a
95% bootstrap interval over the facts; one PNG per metric against m. Every run folder resumes where it stopped.

    python bench/malmen_scaling.py --editor malmen=runs/malmen-cf --editor malmen-untrained=runs/malmen-u0 \\
        --m 1,16,64,256,1024 --n 1024 --runs runs/scaling --out bench/results/malmen_scaling.json \\
        --plots docs/img/malmen_scaling

``--baseline METHOD`` (repeatable) adds a method that needs no trained editor (memit, alphaedit, ...) with its
model preset, all N facts in one call (m = N), beside the editors: what the issue compares MALMEN with.

``--editor-set NAME:KEY=VALUE`` passes an edit-time setting to one editor's runs: the same untrained editor under
two names, one with ``eta_scale`` raised until its efficacy matches the trained editor's.

    python bench/malmen_scaling.py --baseline memit --baseline alphaedit --n 1024 --runs runs/scaling \\
        --out bench/results/locate_scaling.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

METRICS = ("efficacy", "efficacy_acc", "generalization", "generalization_acc", "specificity", "neighborhood_agreement")
PLOTTED = (*METRICS, "generalization_true_paraphrase")


def bootstrap(values: list[float], reps: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% percentile interval (percent)."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(reps))
    return 100 * sum(values) / n, 100 * means[int(0.025 * reps)], 100 * means[int(0.975 * reps) - 1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--editor", action="append", default=[], help="NAME=DIR of a trained MEND/MALMEN editor")
    ap.add_argument("--editor-set", action="append", default=[], metavar="NAME:KEY=VALUE",
                    help="an edit-time setting for one editor's runs (e.g. malmen-u0x8:eta_scale=8, the untrained "
                         "counterpart's step scaled to the trained editor's efficacy)")
    ap.add_argument("--baseline", action="append", default=[],
                    help="a method without a trained editor (memit, alphaedit, ...), all N facts in one call")
    ap.add_argument("--m", default="1,16,64,256,1024", help="facts per call")
    ap.add_argument("--n", type=int, default=1024, help="first N counterfact-edit records")
    ap.add_argument("--runs", default="runs/scaling", help="folder for the run folders")
    ap.add_argument("--out", default="bench/results/malmen_scaling.json")
    ap.add_argument("--plots", help="prefix of the PNG plots (one per metric)")
    ap.add_argument("--include", action="append", default=[],
                    help="an earlier JSON of this script (same N) whose rows join the table and the plots")
    args = ap.parse_args()
    if not args.editor and not args.baseline and not args.include:
        ap.error("name at least one --editor NAME=DIR, --baseline METHOD or --include JSON")

    from factedit import cli
    from factedit.data import default_bench_file, load_counterfact
    from factedit.data.counterfact import is_true_paraphrase
    from factedit.fsutil import read_jsonl, write_json

    para = {c.case_id for c in load_counterfact(default_bench_file("counterfact"), args.n)
            if c.paraphrase_prompts and is_true_paraphrase(c.paraphrase_prompts[0], c.request.subject)}

    editors = dict(e.split("=", 1) for e in args.editor)
    ms = [int(x) for x in args.m.split(",")]
    runs = Path(args.runs)
    pre = runs / "pre"
    common = ["--bench", "counterfact", "--limit", str(args.n), "--set", "eval.ppl_tokens=0",
              "--set", "eval.fluency_cases=0"]
    earlier = {}  # rows of the included JSON files, read (and checked) before any model work
    for f in args.include:
        old = json.loads(Path(f).read_text())
        if old["n"] != args.n:
            raise SystemExit(f"{f}: n = {old['n']}, not {args.n}")
        earlier.update({name: {int(m): row for m, row in rows.items()} for name, rows in old["results"].items()})
    how = {name: ["--method", json.loads((Path(folder) / "editor.json").read_text())["method"], "--editor", folder]
           for name, folder in editors.items()}
    for spec in args.editor_set:
        name, _, setting = spec.partition(":")
        if name not in how or "=" not in setting:
            raise SystemExit(f"--editor-set {spec!r}: expected NAME:KEY=VALUE with NAME one of the --editor names")
        how[name] += ["--set", setting]
    how.update({method: ["--method", method] for method in args.baseline})
    if how and not (pre / "summary.json").exists():
        assert cli.main(["eval", *next(iter(how.values())), *common, "--pre-only", "--out", str(pre)]) == 0
    jobs = [(name, how[name], m) for name in editors for m in ms] + [(b, how[b], args.n) for b in args.baseline]
    table = {}
    for name, how, m in jobs:
        out = runs / f"{name}-m{m}"
        if not (out / "summary.json").exists():
            assert cli.main(["eval", *how, *common, "--mode", "batch",
                             "--batch-size", str(m), "--pre-from", str(pre), "--out", str(out)]) == 0
        recs = read_jsonl(out / "cases.jsonl")
        timing = json.loads((out / "summary.json").read_text())["timing"]
        row = {"n": len(recs), "edit_s_per_fact": timing["edit_s_per_fact"]}
        for k in METRICS:
            vals = [r["post"][k] for r in recs if k in r["post"]]
            if vals:
                row[k] = dict(zip(("mean", "lo", "hi"), (round(x, 2) for x in bootstrap(vals))))
        # generalisation on the records whose rephrase prompt is a true paraphrase (most are generation prompts)
        vals = [r["post"]["generalization"] for r in recs if r["case_id"] in para and "generalization" in r["post"]]
        if vals:
            row["generalization_true_paraphrase"] = dict(zip(("mean", "lo", "hi"),
                                                             (round(x, 2) for x in bootstrap(vals))))
            row["n_true_paraphrase"] = len(vals)
        table.setdefault(name, {})[m] = row
        print(name, m, {k: v["mean"] for k, v in row.items() if isinstance(v, dict)})
    pre_recs = read_jsonl(pre / "cases.jsonl") or read_jsonl(pre / "pre.jsonl")
    unedited = {}
    for k in ("efficacy", "generalization", "specificity"):
        vals = [r["pre"][k] for r in pre_recs if k in r.get("pre", {})]
        if vals:
            unedited[k] = round(100 * sum(vals) / len(vals), 2)
    write_json(Path(args.out), {"n": args.n, "m": ms, "editors": editors, "baselines": args.baseline,
                                "editor_set": args.editor_set,
                                "unedited": unedited, "results": table})
    table = {**earlier, **table}  # the table and the plots show the included rows too (the JSON holds this run's)
    cols = ("efficacy", "efficacy_acc", "generalization", "generalization_true_paraphrase", "specificity",
            "neighborhood_agreement")
    lines = ["| editor | m | " + " | ".join(cols) + " |", "| --- | --- |" + " --- |" * len(cols)]
    lines.append("| unedited | - | " + " | ".join(str(unedited.get(k, "-")) for k in cols) + " |")
    for name, rows in table.items():
        for m in rows:
            lines.append(f"| {name} | {m} | " + " | ".join(
                f"{rows[m][k]['mean']:.1f} [{rows[m][k]['lo']:.1f}, {rows[m][k]['hi']:.1f}]" if k in rows[m] else "-"
                for k in cols) + " |")
    print("\n".join(lines))
    if args.plots:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        Path(args.plots).parent.mkdir(parents=True, exist_ok=True)
        for k in PLOTTED:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for name, rows in table.items():
                xs = [m for m in rows if k in rows[m]]
                if not xs:
                    continue
                mean = [rows[m][k]["mean"] for m in xs]
                ax.errorbar(xs, mean, yerr=[[a - rows[m][k]["lo"] for m, a in zip(xs, mean)],
                                            [rows[m][k]["hi"] - a for m, a in zip(xs, mean)]],
                            marker="o", capsize=3, label=name)
            if k in unedited:
                ax.axhline(unedited[k], color="grey", ls=":", label="unedited")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("facts per call (m)")
            ax.set_ylabel(f"{k} (%)")
            ax.set_title(f"{k}, first {args.n} CounterFact facts")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(f"{args.plots}-{k}.png", dpi=120)
            plt.close(fig)


if __name__ == "__main__":
    main()
