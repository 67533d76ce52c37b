"""z* speed: today's path against the faster ones, each repeated, in one process (issue 26, item 4).

The z* optimisation dominates locate-then-edit editing (MEMIT, AlphaEdit, NSE). This benchmark runs it
on the first N CounterFact-edit records with the model's MEMIT preset (AlphaEdit's z* is the same: the
same site and settings), one edit call of N facts, in these paths:

  straightforward  one request at a time, full forward every step, LM head at every position
  fp32             the optimised path in fp32, the reference early stop (loss < early_stop_loss):
                   requests batched; per step only the blocks from the site up, only on the columns
                   from each row's subject onwards (the earlier columns' keys/values are cached), the
                   LM head only where the loss reads, requests leave the batch when they stop
  bf16             the same under bf16 autocast in the MLPs and the LM head (``autocast=bf16``)
  stop             fp32 with the early stop on the target probability (``early_stop_prob``)
  bf16_stop        both
  auto             the editor's defaults as they resolve on this machine (``autocast=auto``)

Every path runs ``--repeats`` times, interleaved (path A, B, ..., A, B, ...), so that a slow phase of the
machine hits every path alike; the JSON gives each run, the median, and the spread (max − min) / median.
It also records the CPU's bf16 capability, what ``autocast=auto`` chose, and how far each path's z* is
from the fp32 path's (‖z − z_fp32‖ / ‖δ_fp32‖: relative to the change, not to z*).

    python bench/zstar_speed.py --n 20 --repeats 3 --out bench/results/zstar_speed.json
    python bench/zstar_speed.py --paths straightforward,fp32 --n 8 --repeats 1 --flops   # FLOPs per path
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def matmul_peak(dtype: torch.dtype, n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20, help="requests (one edit call)")
    ap.add_argument("--batch", type=int, default=None, help="z* batch (default: the preset's z_batch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stop-prob", type=float, default=None,
                    help="early_stop_prob of the stop paths (default: the preset's, or 0.9 where it is 0)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--flops", action="store_true", help="count matmul FLOPs per path (one more run each)")
    ap.add_argument("--out", default="bench/results/zstar_speed.json")
    ap.add_argument("--paths", default="fp32,bf16,stop,bf16_stop,auto",
                    help="comma-separated subset of straightforward, fp32, bf16, stop, bf16_stop, auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from factedit.data import default_bench_file, load_counterfact
    from factedit.fsutil import write_json
    from factedit.hw import bf16_units, resolve_autocast
    from factedit.lm.load import load_lm
    from factedit.methods.locate import MEMITEditor
    from factedit.methods.locate import values as zvalues
    from factedit.methods.locate.base import z_settings

    lm = load_lm("smollm2-135m")
    lm.model.requires_grad_(False)
    ed = MEMITEditor.create(lm)
    c = ed.config
    reqs = [case.request for case in load_counterfact(default_bench_file("counterfact"), args.n)]
    templates = ed._templates(lm)
    site = lm.arch.block_path(ed.loss_layer_z(lm))
    auto = z_settings(c, lm.device)
    batch = args.batch or auto.batch
    p_stop = args.stop_prob if args.stop_prob is not None else (auto.early_stop_prob or 0.9)
    ref = dataclasses.replace(auto, batch=batch, fast=True, autocast="none", early_stop_prob=0.0)
    paths = {
        "straightforward": dataclasses.replace(ref, batch=1, fast=False),
        "fp32": ref,
        "bf16": dataclasses.replace(ref, autocast="bf16"),
        "stop": dataclasses.replace(ref, early_stop_prob=p_stop),
        "bf16_stop": dataclasses.replace(ref, autocast="bf16", early_stop_prob=p_stop),
        "auto": dataclasses.replace(auto, batch=batch),
    }
    want = args.paths.split(",")
    unknown = set(want) - set(paths)
    if unknown:
        raise SystemExit(f"unknown paths: {sorted(unknown)}")
    paths = {k: paths[k] for k in want}
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    zvalues.compute_z(lm, reqs[:1], templates, site, dataclasses.replace(ref, steps=1), progress=False)  # warm-up
    runs: dict = {k: [] for k in paths}
    zs, infos = {}, {}
    for rep in range(args.repeats):
        for name, s in paths.items():
            t = time.perf_counter()
            z, info = zvalues.compute_z(lm, reqs, templates, site, s, progress=False)
            runs[name].append(time.perf_counter() - t)
            zs[name], infos[name] = z, info
            print(f"repeat {rep} {name}: {runs[name][-1] / len(reqs):.3f} s/request", flush=True)
    d_ref = None  # ‖δ_fp32‖ per request: the z* differences are relative to the fp32 path's change
    if "fp32" in zs:
        from factedit.methods.locate.keys import site_values
        d_ref = (zs["fp32"] - site_values(lm, reqs, site)).norm(dim=1)
    res = {}
    for name, s in paths.items():
        t = runs[name]
        med = statistics.median(t)
        info = infos[name]
        r = {"settings": {"autocast": s.autocast, "early_stop_prob": s.early_stop_prob, "batch": s.batch,
                          "fast": s.fast},
             "s_per_request_median": round(med / len(reqs), 3),
             "s_per_request_runs": [round(x / len(reqs), 3) for x in t],
             "spread": round((max(t) - min(t)) / med, 3),
             "mean_steps": round(sum(i["steps"] + 1 for i in info) / len(info), 2),  # forward passes per request
             "mean_final_loss": round(sum(i["loss"] for i in info) / len(info), 4),
             "mean_final_target_prob": round(sum(i["prob"] for i in info) / len(info), 4),
             "min_final_target_prob": round(min(i["prob"] for i in info), 4)}
        if d_ref is not None:
            rel = (zs[name] - zs["fp32"]).norm(dim=1) / d_ref
            r["z_vs_fp32_rel_to_delta"] = {"mean": round(float(rel.mean()), 4), "max": round(float(rel.max()), 4)}
        if args.flops:
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False) as fc:
                zvalues.compute_z(lm, reqs, templates, site, s, progress=False)
            flops = fc.get_total_flops()
            r["gflop"] = round(flops / 1e9, 1)
            r["fraction_of_matmul_peak"] = round(flops / med / peak["bf16" if s.autocast == "bf16" else "fp32"], 3)
        res[name] = r
    out = {
        "bench": "zstar_speed", "model": lm.name, "n_requests": len(reqs), "templates": len(templates),
        "site": site, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "autocast_auto_resolves_to": resolve_autocast("auto", lm.device),
        "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peak.items()},
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "bf16_units": list(bf16_units()),
                    "loadavg_at_end": os.getloadavg()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "results": res,
    }
    if "fp32" in res:
        out["speedup_vs_fp32"] = {k: round(res["fp32"]["s_per_request_median"] / v["s_per_request_median"], 2)
                                  for k, v in res.items()}
    write_json(Path(args.out), out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
