"""Perplexity after each cumulative round of a sequential run (where does general ability go?).

    python bench/ppl_by_round.py RUN_FOLDER [--tokens 4096] [--out FILE]

Applies RUN_FOLDER/rounds/0000, 0001, ... one after another to the unedited embedded model and
measures WikiText-2 test perplexity after each. For locate-family patches (one rank-one term per
request and layer), it also measures all rounds without the terms of requests whose subject's last
token is the prompt's first token (an attention-sink position on models without a BOS token).
"""

import argparse
import json
from pathlib import Path

import torch

from factedit.data.paths import default_data_dir, general_text
from factedit.eval.scoring import perplexity
from factedit.lm.load import load_lm
from factedit.lm.tokens import subject_last_index
from factedit.patch.io import load_patch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rounds = sorted(p for p in (Path(args.run) / "rounds").iterdir() if (p / "manifest.json").exists())
    if not rounds:
        raise SystemExit(f"{args.run}: no saved rounds")
    lm = load_lm()
    text = general_text(default_data_dir())
    patches = [load_patch(p) for p in rounds]

    def ppl():
        return round(perplexity(lm, text, args.tokens), 3)

    out = {"run": str(args.run), "tokens": args.tokens, "pre": ppl(), "rounds": []}
    sink = [[subject_last_index(lm.tokenizer, r.prompt, r.subject, start=r.prompt.index(r.subject)) == 0
             for r in p.requests] for p in patches]
    out["first_token_subjects"] = [sum(s) for s in sink]
    handles = []
    try:
        for p in patches:
            handles.append(p.apply(lm))
            out["rounds"].append(ppl())
            print(len(out["rounds"]), out["rounds"][-1], flush=True)
    finally:
        for h in reversed(handles):
            h.revert()
    factored = all(getattr(d, "u", None) is not None and d.u.shape[1] == len(s)
                   for p, s in zip(patches, sink) for d in getattr(p, "deltas", {}).values())
    if factored and any(any(s) for s in sink):
        handles = []
        try:
            for p, s in zip(patches, sink):
                keep = torch.tensor([not x for x in s])
                for d in p.deltas.values():
                    d.u, d.v = d.u[:, keep], d.v[:, keep]
                handles.append(p.apply(lm))
            out["without_first_token_subjects"] = ppl()
        finally:
            for h in reversed(handles):
                h.revert()
    print(json.dumps(out))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
