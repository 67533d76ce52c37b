"""Command-line interface. Every input is validated before the model is loaded; user errors print
one line naming the record or file and exit with status 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from . import config as cfgmod
from .commands import cmd_apply, cmd_edit, cmd_eval, cmd_train, editor_class_checked, load_cases, split_sets
from .errors import FactEditError
from .version import __version__

log = logging.getLogger("factedit")


def cmd_methods(args) -> int:
    from .registry import list_methods

    for name, desc in list_methods().items():
        print(f"{name:10s} {desc}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    m_over, e_over = split_sets(args.set)
    editor_class_checked(args.method, m_over)
    return run_demo(args.model, args.method, m_over, e_over, out=args.out, device=args.device)


def cmd_stats(args) -> int:
    from .lm.load import load_lm
    from .stats import corpus_text, describe, key_stats, null_projector

    layers = cfgmod.parse_int_list(args.layers)
    if not layers:
        raise FactEditError("--layers is empty")
    if args.tokens < 1 or args.max_len < 2:
        raise FactEditError("--tokens must be >= 1 and --max-len >= 2")
    corpus_text(args.corpus)  # a missing or empty corpus fails here, before the model loads
    lm = load_lm(args.model, device=args.device)
    lm.check_layers(layers)
    t0 = time.perf_counter()
    stats = key_stats(lm, layers, args.corpus, args.tokens, args.max_len)
    print(f"{'layer':>5} {'keys':>9} {'dim':>5} {'trace':>10} {'eig_min':>10} {'eig_max':>10} {'cond':>10}"
          + ("   null-space kept / energy through" if args.nullspace else ""))
    for row in describe(stats):
        line = (f"{row['layer']:>5} {row['count']:>9} {row['dim']:>5} {row['trace']:>10.4g} {row['eig_min']:>10.3g} "
                f"{row['eig_max']:>10.3g} {row['cond']:>10.3g}")
        if args.nullspace:
            _, info = null_projector(stats[row["layer"]], args.nullspace, args.nullspace_mode)
            line += f"   {info['kept']}/{info['dim']} ({100 * info['kept_fraction']:.1f}%) / {100 * info['energy_through']:.2f}%"
        print(line)
    print(f"statistics ready in {time.perf_counter() - t0:.1f} s (cached under the factedit cache folder)")
    return 0


def cmd_trace(args) -> int:
    from .eval.trace import KINDS, Fact, known_facts, trace
    from .fsutil import write_json
    from .lm.load import load_lm

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise FactEditError(f"--kinds: unknown {bad or 'empty'} (choose from {', '.join(KINDS)})")
    if args.limit < 1 or args.samples < 1 or args.window < 1:
        raise FactEditError("--limit, --samples and --window must be at least 1")
    known = args.answer == "known"
    path, cases = load_cases(args.bench, args.data, None if known else args.limit, "answer")
    if known and any(not c.request.target_true for c in cases):
        bad = next(i for i, c in enumerate(cases) if not c.request.target_true)
        raise FactEditError(f"{path}[{bad}]: --answer known needs the record's true answer, and it has none")
    facts = [Fact(c.request.prompt, c.request.subject, c.request.target_true if args.answer != "model" else None)
             for c in cases]
    lm = load_lm(args.model, device=args.device)
    t0 = time.perf_counter()
    idx, scanned = list(range(len(facts))), len(facts)  # the records traced (indices into the file)
    if known:
        idx = known_facts(lm, facts, args.limit)
        scanned = idx[-1] + 1 if len(idx) >= args.limit else len(facts)
        log.info("trace: %d known facts among the first %d records", len(idx), scanned)
        if not idx:
            raise FactEditError(f"{path}: the model knows none of the {len(facts)} records (greedy next token "
                                "never the true answer's first token); use --answer model or true")
        facts = [facts[i] for i in idx]
    res = trace(lm, facts, kinds, samples=args.samples, window=args.window, noise_factor=args.noise, seed=args.seed)
    res.update({"model": lm.name, "fingerprint": lm.fingerprint, "bench": args.bench, "answer": args.answer,
                "records": idx, "case_ids": [cases[i].request.case_id for i in idx], "scanned": scanned,
                "seconds": round(time.perf_counter() - t0, 1)})
    m = res["mean"]
    cols = [(k, pos) for pos in ("subject_last", "last") for k in kinds]
    print(f"mean indirect effect (P_restored - P_corrupt) over {len(facts)} facts; "
          f"P_clean {res['mean_p_clean']:.3f}, P_corrupt {res['mean_p_corrupt']:.3f}")
    print(f"{'layer':>5} " + " ".join(f"{k + '@' + ('subj' if p == 'subject_last' else 'last'):>12}" for k, p in cols))
    for l in range(res["num_layers"]):
        print(f"{l:>5} " + " ".join(f"{m[k][p][l]:>12.4f}" for k, p in cols))
    print(f"peak {res['peak_kind']} effect at the subject's last token: layer {res['peak_layer']}")
    if args.out:
        write_json(Path(args.out), res)
        print(f"written: {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="factedit", description="Knowledge editing for causal LMs")
    p.add_argument("--version", action="version", version=f"factedit {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    p.add_argument("--device", default=None,
                   help="cpu (default), cuda, cuda:N or auto; default from FACTEDIT_DEVICE, else cpu")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, method_default=None):
        sp.add_argument("--model", default="smollm2-135m", help="embedded name or local HF folder")
        sp.add_argument("--method", default=method_default, required=method_default is None)
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a method config key (eval.KEY for evaluation keys); repeatable")

    sp = sub.add_parser("demo", help="edit a few shipped example facts on the embedded model and evaluate")
    common(sp, method_default="ft")
    sp.add_argument("--out", default=None, help="run folder (default: a temporary folder)")
    sp.set_defaults(fn=cmd_demo)

    sp = sub.add_parser("stats", help="compute (or show cached) key statistics E[k kᵀ] for locate-then-edit methods")
    sp.add_argument("--model", default="smollm2-135m")
    sp.add_argument("--layers", required=True, help="e.g. 3-7 or 3,5,7")
    sp.add_argument("--corpus", default=None, help="text file (default: WikiText-2 validation in shared/data)")
    sp.add_argument("--tokens", type=int, default=200_000)
    sp.add_argument("--max-len", type=int, default=512, help="tokens per window (never the full context)")
    sp.add_argument("--nullspace", type=float, default=None, help="also report AlphaEdit's null space at this threshold")
    sp.add_argument("--nullspace-mode", default="relative", choices=["absolute", "relative"])
    sp.set_defaults(fn=cmd_stats)

    sp = sub.add_parser("trace", help="causal tracing: which layers carry facts at the subject (layer choice)")
    sp.add_argument("--model", default="smollm2-135m")
    sp.add_argument("--bench", default="counterfact", help="a registered benchmark (counterfact, zsre, ...)")
    sp.add_argument("--data", default=None, help="benchmark file (default: shared/data beside the checkout)")
    sp.add_argument("--limit", type=int, default=50, help="first N records")
    sp.add_argument("--kinds", default="hidden,mlp,attn", help="states to restore: hidden, mlp, attn")
    sp.add_argument("--samples", type=int, default=10, help="noise samples per fact (ROME: 10)")
    sp.add_argument("--window", type=int, default=10, help="layers restored together for mlp/attn (ROME: 10)")
    sp.add_argument("--noise", type=float, default=3.0, help="noise std in units of the subject-embedding std")
    sp.add_argument("--answer", choices=["model", "true", "known"], default="model",
                    help="trace the model's own next token, the record's true target, or (known) the true target "
                         "of the first --limit records the model gets right (ROME's known facts)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", default=None, help="JSON file for the full traces")
    sp.set_defaults(fn=cmd_trace)

    sp = sub.add_parser("methods", help="list editing methods")
    sp.set_defaults(fn=cmd_methods)

    sp = sub.add_parser("edit", help="compute a patch for facts in a JSONL/JSON/CSV file")
    common(sp)
    sp.add_argument("--facts", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--overwrite", action="store_true")
    sp.add_argument("--editor", metavar="DIR", help="a trained editor folder (factedit train --out DIR)")
    sp.add_argument("--force", action="store_true", help="use a trained editor made for another base model")
    sp.add_argument("--on", action="append", metavar="PATCH",
                    help="a saved patch to apply first (repeatable, in order): the earlier rounds of a sequential stream")
    sp.add_argument("--state", metavar="DIR",
                    help="the editor's sequential state (accumulated K Kᵀ, templates, NSE's original weights): "
                         "read if DIR exists, written back with this round added; it must have committed "
                         "exactly the --on patches")
    sp.set_defaults(fn=cmd_edit)

    sp = sub.add_parser("train", help="train a trained editor (hyper-network, generator) once for a model")
    common(sp)
    sp.add_argument("--data", required=True, help="training file in a benchmark's format")
    sp.add_argument("--bench", default="counterfact", help="the format of --data (a registered benchmark)")
    sp.add_argument("--limit", type=int, help="first N records")
    sp.add_argument("--zsre-target", default="alt", choices=["answer", "alt"])
    sp.add_argument("--val-data", help="held-out file (same format) to validate on during training, for editors "
                    "that validate (MEND, MALMEN: the best validated state is kept)")
    sp.add_argument("--val-limit", type=int, help="first N records of --val-data")
    sp.add_argument("--out", required=True, help="folder for the trained editor (resumes from OUT.partial)")
    sp.set_defaults(fn=cmd_train)

    sp = sub.add_parser("apply", help="apply a saved patch; show its effect or save the merged model")
    sp.add_argument("--model", default="smollm2-135m")
    sp.add_argument("--patch", required=True, action="append",
                    help="a saved patch folder; repeat to apply several in order (the rounds of a stream)")
    sp.add_argument("--merge", action="store_true")
    sp.add_argument("--out")
    sp.add_argument("--force", action="store_true", help="apply even if the base fingerprint differs")
    sp.add_argument("--prompt", action="append", help="prompt to show before/after (default: the patch's)")
    sp.set_defaults(fn=cmd_apply)

    sp = sub.add_parser("eval", help="edit and evaluate on a benchmark")
    common(sp)
    sp.add_argument("--bench", required=True, help="a registered benchmark (counterfact, zsre, ...)")
    sp.add_argument("--data", help="benchmark file (default: shared/data beside the checkout)")
    sp.add_argument("--data-dir", help="data folder for WikiText-2 (default: FACTEDIT_DATA or shared/data)")
    sp.add_argument("--mode", default="batch", choices=["single", "batch", "sequential"])
    sp.add_argument("--batch-size", type=int, help="sequential mode: edits per round (default 100); batch mode: facts "
                    "per call, each call on the unedited model and reverted (default: all facts in one call)")
    sp.add_argument("--limit", type=int, help="first N records")
    sp.add_argument("--zsre-target", default="answer", choices=["answer", "alt"],
                    help="MEND-format zsRE edit target: gold answer (MEMIT protocol) or alt (EasyEdit)")
    sp.add_argument("--editor", metavar="DIR", help="a trained editor folder (factedit train --out DIR)")
    sp.add_argument("--protocol", choices=["bench", "generation"],
                    help="bench: the benchmark's own teacher-forced protocol (default); generation: greedy answers "
                         "after the model's question template, exact match (eval.template, eval.max_new_tokens)")
    sp.add_argument("--pre-only", action="store_true", help="evaluate the unedited model only (no edits)")
    sp.add_argument("--pre-from", default=None, metavar="RUN",
                    help="reuse pre-edit records of the same cases from an earlier run folder (same model, bench, data)")
    sp.add_argument("--out", required=True)
    sp.set_defaults(fn=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from .lm.load import resolve_device

        if hasattr(args, "model"):  # commands that load a model: an unknown or absent device fails before any work
            args.device = resolve_device(args.device)
        return args.fn(args)
    except FactEditError as e:
        print(f"factedit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("factedit: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
