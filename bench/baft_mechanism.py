"""BaFT's mechanism (issue 23, item 6): where its basis weights are on, and LoReFT's trade-off beside it.

1. BaFT edits the first N CounterFact-edit facts in one batch (its preset, `--set` overrides); then the basis
   weights s(h) of each intervened layer are read at the last prompt token of three kinds of prompts: the edit
   prompts, their rephrase prompts, and the cases' neighbourhood (unrelated) prompts. A histogram of the mean
   weight per prompt, per kind, goes to ``--out-dir/baft_gates.png``.
2. LoReFT on the same facts at several ranks and step counts, and BaFT's point (or points, ``--baft-set``)
   beside them: generalisation against locality (CounterFact specificity and neighbourhood agreement), in
   ``--out-dir/baft_tradeoff.png``.

Everything measured goes to ``--out-dir/baft_mechanism.json``. Run folders go under ``--runs`` (re-running reuses
them). Example: python bench/baft_mechanism.py --n 50 --runs runs/mech
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50, help="first N counterfact-edit records")
    ap.add_argument("--runs", default="runs/mech")
    ap.add_argument("--out-dir", default="bench/results")
    ap.add_argument("--set", action="append", default=[], help="BaFT config override KEY=VALUE (every run)")
    ap.add_argument("--baft-set", action="append", default=[],
                    help="an extra BaFT point: comma-separated KEY=VALUE overrides (repeatable)")
    ap.add_argument("--ranks", default="1,2,4,8", help="LoReFT ranks (at the preset's steps)")
    ap.add_argument("--steps", default="10,30,60", help="LoReFT step counts (at the preset's rank)")
    args = ap.parse_args()

    import torch

    from factedit import cli
    from factedit.data import default_bench_file, load_counterfact
    from factedit.fsutil import write_json
    from factedit.lm.load import load_lm
    from factedit.lm.tokens import encode_target
    from factedit.patch.io import load_patch

    runs = Path(args.runs)
    common = ["--bench", "counterfact", "--limit", str(args.n), "--mode", "batch", "--set", "eval.ppl_tokens=0",
              "--set", "eval.fluency_cases=0"]
    pre = runs / "pre"
    if not (pre / "summary.json").exists():
        assert cli.main(["eval", "--method", "loreft", *common, "--pre-only", "--out", str(pre)]) == 0

    def run(name: str, method: str, sets: list[str]) -> dict:
        out = runs / name
        if not (out / "summary.json").exists():
            argv = ["eval", "--method", method, *common, "--pre-from", str(pre), "--out", str(out)]
            for s in sets:
                argv += ["--set", s]
            assert cli.main(argv) == 0
        s = json.loads((out / "summary.json").read_text())
        keep = ("efficacy", "efficacy_acc", "generalization", "specificity", "neighborhood_agreement")
        return {"post": {k: s["post"].get(k) for k in keep}, "edit_s": s["timing"]["edit_s"], "sets": sets}

    points: dict[str, dict] = {"baft": run("baft", "baft", args.set)}
    for i, extra in enumerate(args.baft_set):
        points[f"baft-{i + 1}"] = run(f"baft-{i + 1}", "baft", args.set + extra.split(","))
    for r in args.ranks.split(","):
        points[f"loreft-r{r}"] = run(f"loreft-r{r}", "loreft", [f"rank={r}"])
    for k in args.steps.split(","):
        points.setdefault(f"loreft-s{k}", run(f"loreft-s{k}", "loreft", [f"steps={k}"]))

    # basis weights of the BaFT patch at the last prompt token of each kind of prompt
    cases = load_counterfact(default_bench_file("counterfact"), args.n)
    kinds = {"edit": [c.request.prompt for c in cases],
             "rephrase": [p for c in cases for p in c.paraphrase_prompts[:1]],
             "unrelated": [p for c in cases for p in c.neighborhood_prompts[:1]]}
    patch = load_patch(runs / "baft" / "patch")
    lm = load_lm()
    gates: dict[str, list[float]] = {}
    with torch.no_grad():
        for kind, prompts in kinds.items():
            vals = []
            for p in prompts:
                ids = torch.tensor([encode_target(lm.tokenizer, p, " x")[0]])
                hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
                vals.append(mean(float(m.weights(hs[pl.layer + 1][0, -1]).mean())
                                 for pl, m in zip(patch.placements, patch.modules)))
            gates[kind] = vals
    summary = {k: {"mean": round(mean(v), 4), "frac_above_0.5": round(mean(float(x > 0.5) for x in v), 4),
                   "n": len(v)} for k, v in gates.items()}
    print(json.dumps(summary, indent=1))
    out_dir = Path(args.out_dir)
    write_json(out_dir / "baft_mechanism.json", {"n": args.n, "gate_summary": summary, "gates": gates,
                                                 "points": points, "usage": patch.meta.get("basis_usage")})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind, v in gates.items():
        ax.hist(v, bins=20, range=(0, 1), alpha=0.5, label=f"{kind} (mean {mean(v):.2f})")
    ax.set_xlabel("mean basis weight s(h), last prompt token")
    ax.set_ylabel("prompts")
    ax.set_title(f"BaFT gates, first {args.n} CounterFact facts")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "baft_gates.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, loc in zip(axes, ("specificity", "neighborhood_agreement")):
        for name, pt in points.items():
            x, y = pt["post"]["generalization"], pt["post"][loc]
            ax.scatter([x], [y], marker="*" if name.startswith("baft") else "o",
                       color="C3" if name.startswith("baft") else "C0", s=80 if name.startswith("baft") else 30)
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("generalisation (%)")
        ax.set_ylabel(f"{loc} (%)")
    fig.suptitle(f"LoReFT (rank, steps varied) and BaFT, first {args.n} CounterFact facts, batch", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "baft_tradeoff.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
