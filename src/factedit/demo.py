"""`factedit demo`: edit the shipped example facts on the embedded model, show answers and metrics."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .data.facts import demo_cases
from .data.paths import default_data_dir, general_text


def _answer(lm, prompt: str) -> str:
    from .lm.generate import sample

    n = len(lm.tokenizer(prompt)["input_ids"])
    return sample(lm, prompt, n + 6, greedy=True, stop_at_eos=True).strip().split("\n")[0]


def run_demo(model: str, method: str, overrides: dict, eval_overrides: dict, out: str | None = None,
             device: str | None = None) -> int:
    from .eval.harness import Runner, eval_config
    from .eval.report import table
    from .lm.load import load_lm
    from .patch.io import load_patch
    from .registry import get_editor_class

    cases = demo_cases()
    ecfg = eval_config({"fluency_cases": 5, "ppl_tokens": 4096, "gen_length": 60, **eval_overrides})
    t0 = time.perf_counter()
    lm = load_lm(model, device=device)
    print(f"loaded {lm.name} ({lm.n_layers} layers, fingerprint {lm.fingerprint}) in {time.perf_counter() - t0:.1f} s")
    editor = get_editor_class(method).create(lm, overrides)
    probes = [(c.request.prompt, "edit") for c in cases] + [(p, "paraphrase") for c in cases
                                                          for p in c.paraphrase_prompts] + \
             [(p, "neighbour") for c in cases for p in c.neighborhood_prompts]
    before = {p: _answer(lm, p) for p, _ in probes}
    out_dir = Path(out) if out else Path(tempfile.mkdtemp(prefix="factedit-demo-"))
    summary = Runner(lm, editor, cases, bench="counterfact", mode="batch", out=out_dir, eval_cfg=ecfg,
                     general_text=general_text(default_data_dir()), data="factedit/data/examples/demo.jsonl").run()
    with load_patch(out_dir / "patch").apply(lm):
        after = {p: _answer(lm, p) for p, _ in probes}
    print(f"\nEdits ({method}): " + "; ".join(f"{c.request.subject}: {c.request.target_true} -> {c.request.target_new}"
                                            for c in cases))
    for p, kind in probes:
        print(f"[{kind}] {p}\n    before: {before[p][:60]}\n    after:  {after[p][:60]}")
    print()
    print(table(summary))
    print(f"run folder: {out_dir}")
    return 0
