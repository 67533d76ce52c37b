"""Why does a sequential NSE run miss some edits? Distance to z* per request, against post-edit efficacy.

    python bench/nse_distance.py RUN_FOLDER FIRST END [--out FILE]

For the records FIRST..END-1 of a finished `factedit eval --method nse --mode sequential` run, reads their z*
(the z* store: NSE's z* come from the unedited weights), measures ‖z* − h_L‖ at the subject (the quantity NSE's
passes select on) on the unedited model and after applying all the run's saved round patches, and splits the
figures by the run's post-edit efficacy of each record. Also prints the post-edit efficacy per round.
"""

import argparse
import json
from pathlib import Path

import torch

from factedit import get_editor
from factedit.fsutil import write_json
from factedit.lm.load import load_lm
from factedit.methods.base import frozen
from factedit.methods.locate import keys as lkeys
from factedit.patch.io import load_patch
from factedit.types import EditRequest


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("first", type=int)
    ap.add_argument("end", type=int)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    run = Path(args.run)
    info = json.loads((run / "run.json").read_text())
    rows = [json.loads(line) for line in open(run / "cases.jsonl")]
    k = int(info.get("edit_batch") or 100)
    by_round: dict = {}
    for r in rows:
        by_round.setdefault(r["index"] // k, []).append(r["post"]["efficacy"])
    per_round = [round(100 * sum(v) / len(v), 1) for _, v in sorted(by_round.items())]
    print("post-edit efficacy by round:", per_round)
    lm = load_lm(info.get("model") or "smollm2-135m")
    sel = rows[args.first : args.end]
    reqs = [EditRequest(**r["request"]) for r in sel]
    ed = get_editor("nse", lm, **info["method_config"])
    with frozen(lm), torch.no_grad():
        zs, infos = ed._z(lm, reqs)
    site = lm.arch.block_path(ed.loss_layer_z(lm))
    h0 = lkeys.site_values(lm, reqs, site)
    handles = [load_patch(p).apply(lm) for p in sorted((run / "rounds").iterdir()) if (p / "manifest.json").exists()]
    try:
        h1 = lkeys.site_values(lm, reqs, site)
    finally:
        for h in reversed(handles):
            h.revert()
    d0, d1 = (zs - h0).norm(dim=1), (zs - h1).norm(dim=1)
    ok = torch.tensor([r["post"]["efficacy"] > 0.5 for r in sel])

    def mean(x, m):
        return round(float(x[m].mean()), 2) if m.any() else None

    out = {"run": str(run), "records": [args.first, args.end], "efficacy_by_round": per_round,
           "failed": int((~ok).sum()), "dist_before": {"ok": mean(d0, ok), "failed": mean(d0, ~ok)},
           "dist_after": {"ok": mean(d1, ok), "failed": mean(d1, ~ok)},
           "failures": [{"index": sel[i]["index"], "prompt": reqs[i].prompt, "target_new": reqs[i].target_new,
                         "dist_before": round(float(d0[i]), 2), "dist_after": round(float(d1[i]), 2),
                         "efficacy_margin": round(sel[i]["post"]["efficacy_magnitude"], 4),
                         "z_loss": infos[i].get("loss")} for i in torch.nonzero(~ok).flatten().tolist()]}
    print(json.dumps(out, indent=1))
    if args.out:
        write_json(args.out, out)


if __name__ == "__main__":
    main()
