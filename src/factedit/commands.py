"""The commands that edit and evaluate: eval, edit (with sequential streams), train and apply, and the checks
they share. Every input is validated before a model is loaded (see cli.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from . import config as cfgmod
from .errors import FactEditError

log = logging.getLogger("factedit")


def split_sets(pairs: list[str] | None) -> tuple[dict, dict]:
    """--set key=value -> (method overrides, eval overrides); eval keys are written ``eval.key``."""
    method, ev = {}, {}
    for k, v in cfgmod.parse_sets(pairs).items():
        (ev if k.startswith("eval.") else method)[k.removeprefix("eval.")] = v
    return method, ev


def editor_class_checked(name: str, overrides: dict):
    from .registry import get_editor_class

    cls = get_editor_class(name)
    cfgmod.build(cls.Config, overrides, what=f"{name} config")  # reject unknown keys / bad values now
    return cls


def check_editor_dir(cls, editor_dir: str | None) -> None:
    """--editor DIR: a trained editor folder, for a trained method (checked before the model loads)."""
    from .methods.trained import MANIFEST, TrainedEditor

    if editor_dir is None:
        return
    if not issubclass(cls, TrainedEditor):
        raise FactEditError(f"--editor: {cls.name} is not a trained editor (it needs no training)")
    if not (Path(editor_dir) / MANIFEST).is_file():
        raise FactEditError(f"--editor {editor_dir}: not a trained editor folder (no {MANIFEST})")


def make_editor(cls, lm, overrides: dict, editor_dir: str | None, force: bool = False):
    if editor_dir is None:
        return cls.create(lm, overrides)
    return cls.from_pretrained(editor_dir, lm, overrides, force=force)


def load_cases(bench: str, data: str | None, limit: int | None, zsre_target: str):
    from .data import default_bench_file
    from .eval.benches import get_benchmark

    b = get_benchmark(bench)
    path = Path(data) if data else default_bench_file(bench)
    return path, b.load(path, limit, {"zsre_target": zsre_target})


def cmd_eval(args) -> int:
    from .data.paths import default_data_dir, general_text
    from .eval.harness import Runner, check_mode, eval_config
    from .eval.report import table
    from .lm.load import load_lm

    m_over, e_over = split_sets(args.set)
    if getattr(args, "protocol", None):
        e_over["protocol"] = args.protocol
    cls = editor_class_checked(args.method, m_over)
    check_editor_dir(cls, args.editor)
    ecfg = eval_config(e_over)
    check_mode(ecfg, args.mode)
    if args.limit is not None and args.limit < 1:
        raise FactEditError("--limit must be at least 1")
    path, cases = load_cases(args.bench, args.data, args.limit, args.zsre_target)
    if args.pre_from and not (Path(args.pre_from) / "run.json").is_file():
        raise FactEditError(f"--pre-from {args.pre_from}: not a run folder (no run.json)")
    text = general_text(Path(args.data_dir) if args.data_dir else default_data_dir())
    lm = load_lm(args.model, device=args.device)
    editor = make_editor(cls, lm, m_over, args.editor)
    for c in cases:  # subject/token checks before any model work
        editor.validate(lm, [c.request])
    runner = Runner(lm, editor, cases, bench=args.bench, mode=args.mode, out=Path(args.out),
                    edit_batch=args.batch_size, eval_cfg=ecfg, general_text=text, data=str(path),
                    pre_only=args.pre_only, pre_from=Path(args.pre_from) if args.pre_from else None)
    summary = runner.run()
    print(table(summary))
    print(f"run folder: {args.out}")
    return 0


def cmd_edit(args) -> int:
    from .data import load_facts
    from .lm.load import load_lm
    from .patch.io import load_patch, patch_digest
    from .stream import EditStream

    m_over, _ = split_sets(args.set)
    cls = editor_class_checked(args.method, m_over)
    check_editor_dir(cls, args.editor)
    requests = load_facts(args.facts)
    out = Path(args.out)
    on = list(args.on or [])
    state_dir = Path(args.state) if args.state else None
    stream = EditStream(state_dir, cls.name) if state_dir else None
    tag = {"state": str(state_dir.resolve()), "round": len(on) + 1} if state_dir else None
    if out.exists() and any(out.iterdir()) and not args.overwrite and not (stream and stream.is_unfinished(out, tag)):
        raise FactEditError(f"output folder '{out}' exists and is not empty (use --overwrite)")
    earlier = [load_patch(p) for p in on]  # each folder read and checked before the model loads
    if any(out.resolve() == Path(p).resolve() for p in on) or (state_dir and out.resolve() == state_dir.resolve()):
        raise FactEditError("--out must be a new folder, not one of the --on patches or the --state folder")
    if stream is not None:
        stream.check_rounds([patch_digest(p) for p in on], [f"--on {p}" for p in on], source="--on")
    lm = load_lm(args.model, device=args.device)
    editor = make_editor(cls, lm, m_over, args.editor, force=args.force)
    if stream is None and on and editor.remembers_rounds:
        raise FactEditError(f"{args.method} remembers earlier rounds (their accumulated keys): editing on top of "
                            "--on patches needs --state DIR, the folder those rounds wrote")
    if stream is not None:
        stream.restore(lm, editor)
    with contextlib.ExitStack() as applied:  # the --on patches, reverted in reverse order on the way out
        for path, p in zip(on, earlier):
            if p.method != args.method:
                log.warning("--on %s was made by %s, not %s", path, p.method, args.method)
            applied.enter_context(p.apply(lm))
        t0 = time.perf_counter()
        patch = editor.compute(lm, requests)
        dt = time.perf_counter() - t0
        patch.meta["edit_s"] = dt
        if tag is not None:
            patch.meta["stream"] = tag
        patch.save(out)
        if stream is not None:  # the patch is saved first (see factedit.stream)
            stream.commit(patch, out, lm)
    where = f" on top of {len(on)} earlier round(s)" if on else ""
    print(f"{len(requests)} facts edited with {args.method}{where} in {dt:.1f} s ({patch.n_params():,} patch "
          f"parameters); patch saved to {out}" + (f"; state in {state_dir} (round {stream.n_rounds})" if stream else ""))
    return 0


def _init_distributed() -> tuple[int, int]:
    """(rank, world size): under torchrun (WORLD_SIZE > 1) join the process group (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def cmd_train(args) -> int:
    import shutil

    from .fsutil import write_json
    from .lm.load import load_lm
    from .methods.trained import MANIFEST, TrainedEditor, data_digest

    m_over, _ = split_sets(args.set)
    cls = editor_class_checked(args.method, m_over)
    if not issubclass(cls, TrainedEditor):
        raise FactEditError(f"{args.method} is not a trained editor: it needs no 'factedit train'")
    out = Path(args.out)
    if (out / MANIFEST).exists():
        raise FactEditError(f"--out {out} already holds a trained editor; choose another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FactEditError(f"--out {out} exists and is not empty")
    if args.limit is not None and args.limit < 1:
        raise FactEditError("--limit must be at least 1")
    if args.val_limit is not None and args.val_limit < 1:
        raise FactEditError("--val-limit must be at least 1")
    path, cases = load_cases(args.bench, args.data, args.limit, args.zsre_target)
    val_path, val_cases = (load_cases(args.bench, args.val_data, args.val_limit, args.zsre_target) if args.val_data
                           else (None, None))
    rank, world = _init_distributed()
    device = args.device
    if world > 1 and str(device).startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    lm = load_lm(args.model, device=device)
    editor = cls.create(lm, m_over)
    # an interrupted training resumes from OUT.partial, if it was the same training (method, config, data, model)
    run = {"method": cls.name, "config": editor.config_dict(), "data": str(path), "data_digest": data_digest(cases),
           "fingerprint": lm.fingerprint,
           "val_data": str(val_path) if val_path else None, "val_digest": data_digest(val_cases) if val_cases else None}
    ckpt = out.with_name(out.name + ".partial")
    rec = ckpt / "run.json"
    if rec.is_file():
        import json

        if json.loads(rec.read_text()) != json.loads(json.dumps(run, default=str)):
            raise FactEditError(f"{ckpt} holds an interrupted training of another run (other method, config, data "
                                "or model); remove it or choose another --out")
        log.info("train: resuming from %s", ckpt)
    elif rank == 0:
        write_json(rec, run)
    t0 = time.perf_counter()
    metrics = editor.fit(lm, cases, checkpoint=ckpt / "state", val_cases=val_cases)
    editor.trained["train_s"] = round(time.perf_counter() - t0, 1)
    if world > 1:
        editor.trained["ranks"] = world
        import torch.distributed as dist

        dist.barrier()
        if rank != 0:  # rank 0 writes the one artifact
            dist.destroy_process_group()
            return 0
    editor.save_pretrained(out)
    shutil.rmtree(ckpt, ignore_errors=True)
    if world > 1:
        dist.destroy_process_group()
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                      if isinstance(v, (int, float)))
    print(f"{cls.name} trained on {len(cases)} cases of {path} ({shown}); editor saved to {out}")
    return 0


def cmd_apply(args) -> int:
    from .fsutil import atomic_dir
    from .lm.generate import sample
    from .lm.load import load_lm
    from .patch.io import load_patch

    patches = [load_patch(p) for p in args.patch]
    if args.merge and not args.out:
        raise FactEditError("--merge needs --out DIR to write the merged model")
    for path, patch in zip(args.patch, patches):
        if args.merge and patch.kind != "weights":
            raise FactEditError(f"{path}: a {patch.kind} patch ({patch.method}) is input-dependent and cannot be "
                                "merged into weights; apply it at load time instead")
    if args.out and Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise FactEditError(f"output folder '{args.out}' exists and is not empty")
    lm = load_lm(args.model, device=args.device)
    prompts = args.prompt or [r.prompt for p in patches for r in p.requests][:10]
    before = [sample(lm, p, len(p.split()) + 16, greedy=True, stop_at_eos=True) for p in prompts]
    with contextlib.ExitStack() as applied:  # reverted in reverse order on the way out, unless merged
        handles = [applied.enter_context(patch.apply(lm, force=args.force)) for patch in patches]  # in order
        for p, b in zip(prompts, before):
            a = sample(lm, p, len(p.split()) + 16, greedy=True, stop_at_eos=True)
            print(f"{p}\n   before: {b.strip()[:80]}\n   after:  {a.strip()[:80]}")
        if args.merge:
            for h in handles:
                h.merge()
            out = Path(args.out)
            with atomic_dir(out) as tmp:
                lm.model.save_pretrained(tmp, safe_serialization=True)
                lm.tokenizer.save_pretrained(tmp)
            print(f"merged model saved to {out}" + (f" ({len(patches)} patches)" if len(patches) > 1 else ""))
    return 0
