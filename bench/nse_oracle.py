"""Is NSE's efficacy capped by its rewound z*? Efficacy with h_L set to z*, on the unedited and the edited model.

    python bench/nse_oracle.py --n 1000 --rounds-of 100 --out bench/results/nse-oracle-seq1000.json

NSE computes every z* on the unedited weights and edits until ‖z* − h_L‖ < α at the subject's last token.
This edits the first N CounterFact-edit records with the NSE preset in sequential rounds (z* from the z*
store, as `bench/solve_sweep.py` does; the same computation as `factedit eval --mode sequential`), then
measures, per round, efficacy (P(new) > P(true), mean token log-probability, on the bare rewrite prompt)
three ways:

  edited        the edited model as it is (what the evaluation measures)
  oracle_orig   the unedited model with h_L at the subject's last token replaced by z* (what z* promises)
  oracle_edit   the edited model with h_L replaced by z*: NSE reaching its z* exactly, in the edited context

If oracle_edit is below oracle_orig, reaching z* is not enough after the edits: the edited layers below the
site also change the prompt's other tokens, and a z* computed on the unedited model does not account for that.
"""

import argparse
import contextlib
import json
import platform
import time

import torch

from factedit import get_editor
from factedit.data import default_bench_file, load_counterfact
from factedit.fsutil import write_json
from factedit.lm.hooks import Trace, first, replace_first
from factedit.lm.load import load_lm
from factedit.lm.tokens import encode_target, pad_batch, subject_last_index
from factedit.methods.base import frozen


@torch.no_grad()
def efficacy(lm, reqs, site_mod=None, zs=None, batch=32) -> list[bool]:
    """P(new) > P(true) per request on its bare prompt; with ``zs``, h at ``site_mod``'s output (subject's last
    token) is replaced by z*."""
    tok, dev = lm.tokenizer, lm.device
    out = []
    for s in range(0, len(reqs), batch):
        rs = reqs[s : s + batch]
        seqs, spans, subj, owner = [], [], [], []
        for j, r in enumerate(rs):
            pos = subject_last_index(tok, r.prompt, r.subject, start=r.prompt.index(r.subject))
            for tgt in (r.target_new, r.target_true):
                p_ids, t_ids = encode_target(tok, r.prompt, tgt)
                seqs.append(p_ids + t_ids)
                spans.append((len(p_ids), len(t_ids)))
                subj.append(pos)
                owner.append(s + j)
        ids, mask = pad_batch(seqs, tok.pad_token_id)
        with contextlib.ExitStack() as stack:
            if zs is not None:
                rows, cols, val = torch.arange(len(seqs)), torch.tensor(subj), zs[torch.tensor(owner)].to(dev)

                def put(o, _args, rows=rows, cols=cols, val=val):
                    h = first(o).clone()
                    h[rows, cols] = val.to(h.dtype)
                    return replace_first(o, h)

                stack.enter_context(Trace(site_mod, retain_output=False, edit_output=put))
            logp = torch.log_softmax(lm.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float(), -1)
        scores = []
        for i, (p, t) in enumerate(spans):
            tgt = ids[i, p : p + t].to(dev)
            scores.append(float(logp[i, p - 1 : p - 1 + t].gather(1, tgt[:, None]).mean()))
        out += [scores[2 * j] > scores[2 * j + 1] for j in range(len(rs))]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rounds-of", type=int, default=100)
    ap.add_argument("--z-batch", type=int, default=100)
    ap.add_argument("--set", action="append", default=[], help="KEY=JSON override of the NSE preset")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lm = load_lm("smollm2-135m")
    reqs = [c.request for c in load_counterfact(default_bench_file("counterfact"), args.n)]
    over = {k: json.loads(v) for k, v in (x.split("=", 1) for x in args.set)}
    ed = get_editor("nse", lm, z_batch=args.z_batch, **over)
    t = time.time()
    with frozen(lm), torch.no_grad():
        zs, infos = ed._z(lm, reqs)  # from the z* store when an earlier run filled it
    print(f"z*: {time.time() - t:.0f} s", flush=True)
    site = lm.model.get_submodule(lm.arch.block_path(ed.loss_layer_z(lm)))
    orig = efficacy(lm, reqs, site, zs)
    k = args.rounds_of
    handles = []
    try:
        for s in range(0, args.n, k):
            ed._z = lambda _lm, _reqs, s=s: (zs[s : s + k], infos[s : s + k])  # NSE rewinds: the unedited z*
            p = ed.compute(lm, reqs[s : s + k])
            handles.append(p.apply(lm))
            ed.commit(p)
        edited = efficacy(lm, reqs)
        oracle = efficacy(lm, reqs, site, zs)
    finally:
        for h in reversed(handles):
            h.revert()

    def pct(xs, lo, hi):
        return round(100 * sum(xs[lo:hi]) / max(1, len(xs[lo:hi])), 1)

    rounds = [{"records": [s, min(s + k, args.n)], "edited": pct(edited, s, s + k), "oracle_orig": pct(orig, s, s + k),
               "oracle_edit": pct(oracle, s, s + k)} for s in range(0, args.n, k)]
    fail = [i for i in range(args.n) if not edited[i]]
    out = {"bench": "nse_oracle", "n": args.n, "rounds_of": k, "overrides": over,
           "efficacy": {"edited": pct(edited, 0, args.n), "oracle_orig": pct(orig, 0, args.n),
                        "oracle_edit": pct(oracle, 0, args.n)},
           "edited_failures": {"count": len(fail), "oracle_orig_ok": sum(orig[i] for i in fail),
                               "oracle_edit_ok": sum(oracle[i] for i in fail)},
           "rounds": rounds, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "machine": platform.machine()}
    print(json.dumps(out, indent=1))
    if args.out:
        write_json(args.out, out)


if __name__ == "__main__":
    main()
