"""The added cost per query of a trained MeG editor against plain generation, batched.

For the first N edit prompts (gated in) and their neighbourhood prompts (mostly gated out), in batches of B: greedy
answers of the unedited model, the same with MeG's patch applied, and the parts MeG adds (the encoder on the raw
and the template-wrapped queries, the familiarity network, the 50 sampling steps of the generator), each timed
alone. Writes JSON.

    python bench/meg_cost.py --editor runs/meg/meg-128 --n 64 --out bench/results/meg_cost.json
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--editor", required=True)
    ap.add_argument("--data", default=None, help="CounterFact file (default: counterfact-edit beside the checkout)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default="bench/results/meg_cost.json")
    args = ap.parse_args()

    from factedit.data import default_bench_file, load_counterfact
    from factedit.fsutil import write_json
    from factedit.lm.generate import greedy_answers
    from factedit.lm.load import load_lm
    from factedit.methods.meg.editor import MeGEditor
    from factedit.methods.meg.module import strip_template

    lm = load_lm(args.model)
    ed = MeGEditor.from_pretrained(args.editor, lm)
    cases = load_counterfact(args.data or default_bench_file("counterfact"), args.n)
    sets = {"edit": [ed.q(c.request.prompt) for c in cases],
            "neighbourhood": [ed.q(c.neighborhood_prompts[0]) for c in cases]}
    patch = ed.compute(lm, [c.request for c in cases])
    mod = patch.modules[0]
    out = {"editor": args.editor, "n": args.n, "batch": args.batch, "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "per_query_ms": {}}

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t0) / args.n

    for name, prompts in sets.items():
        row = {"plain": timed(lambda p=prompts: greedy_answers(lm, p, batch_size=args.batch))}
        with patch.apply(lm):
            row["meg"] = timed(lambda p=prompts: greedy_answers(lm, p, batch_size=args.batch))
        raw = [strip_template(ed.config.template, p) for p in prompts]
        row["encoder"] = timed(lambda r=raw, p=prompts: (mod.encoder.embed(r), mod.encoder.embed(p)))
        emb = mod.encoder.embed(raw)
        row["familiarity"] = timed(lambda e=emb: mod.fam.entropy(e))
        _, on, _ = mod.neurons(prompts)
        row["gated_in"] = int(on.sum())
        cond = mod.encoder.embed(prompts)
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        row["sampling_all"] = timed(lambda c=cond, g=gens: mod.diffusion.sample(mod.gen, c, mod.shape.size, g))
        out["per_query_ms"][name] = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
        print(name, out["per_query_ms"][name], flush=True)
    write_json(Path(args.out), out)


if __name__ == "__main__":
    main()
