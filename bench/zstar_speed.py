"""z* speed: the straightforward per-request path vs the optimised batched path, in one run.

The z* optimisation dominates locate-then-edit editing (MEMIT, AlphaEdit, NSE). This benchmark runs it
on the first N CounterFact-edit records of the embedded model with the MEMIT preset, three ways:

  straightforward  one request at a time, full forward every step, LM head at every position
  optimised        requests batched; per step only blocks from the site up, only on the columns from
                   each row's subject onwards (the earlier columns' keys/values are cached), LM head only
                   where the loss reads, requests leave the batch when they stop
  optimised_bf16   the same under bf16 autocast (only worth it where the CPU has amx_bf16/avx512_bf16;
                   the JSON records which of these the CPU has)

and reports seconds per request, the matmul FLOPs actually executed (counted with torch's
FlopCounterMode in a separate pass) and the achieved fraction of this machine's measured matmul
throughput. It also checks that the paths agree (max relative difference of z*).

    python bench/zstar_speed.py --n 8 --out bench/results/zstar_speed.json [--paths straightforward,optimised]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def bf16_flags() -> list[str]:
    """The CPU's bf16 matrix/vector extensions (amx_bf16, avx512_bf16); empty: bf16 is emulated."""
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in ("amx_bf16", "avx512_bf16", "amx_tile"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8, help="requests")
    ap.add_argument("--batch", type=int, default=8, help="requests per batch in the optimised path")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="bench/results/zstar_speed.json")
    ap.add_argument("--paths", default="straightforward,optimised,optimised_bf16",
                    help="comma-separated subset of straightforward, optimised, optimised_bf16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from torch.utils.flop_counter import FlopCounterMode

    from factedit.data import default_bench_file, load_counterfact
    from factedit.lm.load import load_lm
    from factedit.methods.locate import MEMITEditor
    from factedit.methods.locate import values as zvalues
    from factedit.methods.locate.base import z_settings

    lm = load_lm("smollm2-135m")
    for p in lm.model.parameters():
        p.requires_grad_(False)
    ed = MEMITEditor.create(lm)
    c = ed.config
    reqs = [case.request for case in load_counterfact(default_bench_file("counterfact"), args.n)]
    templates = ed._templates(lm)
    site = lm.arch.block_path(max(c.layers))
    base = z_settings(c)
    import dataclasses

    paths = {
        "straightforward": dataclasses.replace(base, batch=1, fast=False, autocast="none"),
        "optimised": dataclasses.replace(base, batch=args.batch, fast=True, autocast="none"),
        "optimised_bf16": dataclasses.replace(base, batch=args.batch, fast=True, autocast="bf16"),
    }
    want = args.paths.split(",")
    unknown = set(want) - set(paths)
    if unknown:
        raise SystemExit(f"unknown paths: {sorted(unknown)}")
    paths = {k: v for k, v in paths.items() if k in want}
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    res: dict = {}
    zs = {}
    for name, s in paths.items():
        t = time.perf_counter()
        z, info = zvalues.compute_z(lm, reqs, templates, site, s, progress=False)
        dt = time.perf_counter() - t
        with FlopCounterMode(display=False) as fc:
            zvalues.compute_z(lm, reqs, templates, site, s, progress=False)
        flops = fc.get_total_flops()
        pk = peak["bf16" if s.autocast == "bf16" else "fp32"]
        zs[name] = z
        res[name] = {"s_per_request": round(dt / len(reqs), 3), "total_s": round(dt, 2), "gflop": round(flops / 1e9, 1),
                     "achieved_gflops": round(flops / dt / 1e9, 1), "fraction_of_matmul_peak": round(flops / dt / pk, 3),
                     "mean_final_loss": round(sum(i["loss"] for i in info) / len(info), 4),
                     "mean_steps": round(sum(i["steps"] for i in info) / len(info), 2)}
        print(name, res[name], flush=True)
    ref = zs.get("straightforward", zs["optimised"])
    for name, z in zs.items():
        res[name]["max_rel_diff_vs_reference"] = float((z - ref).norm(dim=1).max() / ref.norm(dim=1).min())
    out = {
        "bench": "zstar_speed", "model": lm.name, "n_requests": len(reqs), "templates": len(templates),
        "settings": dataclasses.asdict(base), "threads": torch.get_num_threads(),
        "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peak.items()},
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "bf16_matmul_units": bf16_flags(),
                    "loadavg_at_end": os.getloadavg()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "results": res,
    }
    if "straightforward" in res:
        out["speedup"] = {k: round(res["straightforward"]["s_per_request"] / v["s_per_request"], 2)
                          for k, v in res.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
