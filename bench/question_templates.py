"""Which question template a model answers best under the generation protocol (evidence for
``presets/generation/<family>.yaml``).

For each candidate template, the unedited model answers greedily (up to 20 new tokens, stopped at end of sequence)
the first N zsRE eval questions and the first N CounterFact-edit prompts; reported per template and benchmark: exact
match with the true answer (zsRE: the gold answer; CounterFact: target_true) under the protocol's normalisation,
the share of answers that start with the true answer, the mean answer length in words, and the share of empty
answers. Writes JSON.

    python bench/question_templates.py --n 200 --out bench/results/question_templates_smollm2.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

CANDIDATES = {
    "bare": "{q}",
    "meg-llama3": "Answer the following question in less than 5 words: {q} \nAnswer:",
    "qa": "Q: {q}\nA:",
    "chat": "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
    "chat-short": "<|im_start|>system\nAnswer in less than 5 words.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
                  "<|im_start|>assistant\n",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--template", action="append", default=[], help="NAME=TEMPLATE (default: the built-in candidates)")
    ap.add_argument("--out", default="bench/results/question_templates.json")
    args = ap.parse_args()

    from factedit.data import default_bench_file, load_counterfact
    from factedit.data.zsre import load_zsre
    from factedit.eval.generation import wrap
    from factedit.fsutil import write_json
    from factedit.lm.generate import greedy_answers, normalize_answer
    from factedit.lm.load import load_lm

    cands = dict(t.split("=", 1) for t in args.template) if args.template else CANDIDATES
    lm = load_lm(args.model)
    zs = load_zsre(default_bench_file("zsre"), args.n, target="answer")
    cf = load_counterfact(default_bench_file("counterfact"), args.n)
    sets = {"zsre": [(c.request.prompt, c.request.target_new) for c in zs],
            "counterfact": [(c.request.prompt, c.request.target_true) for c in cf]}
    res = {}
    for name, tpl in cands.items():
        for bench, items in sets.items():
            t0 = time.perf_counter()
            ans = greedy_answers(lm, [wrap(tpl, p) for p, _ in items], max_new_tokens=20)
            em = [normalize_answer(a) == normalize_answer(t) for a, (_, t) in zip(ans, items)]
            starts = [normalize_answer(a).startswith(normalize_answer(t)) for a, (_, t) in zip(ans, items)]
            words = [len(normalize_answer(a).split()) for a in ans]
            res.setdefault(name, {"template": tpl})[bench] = {
                "exact_match": round(100 * sum(em) / len(em), 2), "starts_with_answer": round(100 * sum(starts) / len(em), 2),
                "mean_words": round(sum(words) / len(words), 2), "empty": round(100 * sum(w == 0 for w in words) / len(words), 2),
                "seconds": round(time.perf_counter() - t0, 1), "examples": [[p, a, t] for (p, t), a in list(zip(items, ans))[:4]]}
            print(name, bench, {k: v for k, v in res[name][bench].items() if k != "examples"}, flush=True)
    write_json(Path(args.out), {"model": args.model, "n": args.n, "results": res})


if __name__ == "__main__":
    main()
