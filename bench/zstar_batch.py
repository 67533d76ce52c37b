"""z* batch size (and bf16 autocast): seconds per request-step for one round of requests, interleaved.

    python bench/zstar_batch.py 100,32,100,32 100 200 bench/results/zstar_batch.json
    python bench/zstar_batch.py 100,100bf16,100,100bf16 100 200 bench/results/zstar_bf16.json

A size with the suffix "bf16" runs z* under bf16 autocast (`--set autocast=bf16`); it pays only where
the CPU has bf16 matrix units (amx_bf16), which the JSON records.

Computes z* (AlphaEdit's preset z* settings and site, the unedited SmolLM2-135M, no z* store)
for the CounterFact-edit records [LO, HI) once per listed batch size, in the listed order, in one
process: alternating the sizes spreads this VM's drift over both. The one-time mid-stack check runs
before the timed calls. The result per batch size is the same within float tolerance; bf16 differs more.
The JSON records each run's difference from the first, relative to the shift z* - h, and the fp32 and bf16
matmul peaks measured at the end: this VM's speed varies by up to 1.5x between days.
"""

import dataclasses
import platform
import sys
import time

import torch
from zstar_speed import cpu_name, matmul_peak  # bench/zstar_speed.py, beside this script

from factedit.data import default_bench_file, load_counterfact
from factedit.fsutil import write_json
from factedit.hw import bf16_units
from factedit.lm.load import load_lm
from factedit.methods.locate import keys as lkeys
from factedit.methods.locate import values as zvalues
from factedit.methods.locate.base import z_settings
from factedit.registry import get_editor_class


def main():
    specs, lo, hi, out_path = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    bad = [x for x in specs if not x.removesuffix("bf16").isdigit()]
    if bad:
        raise SystemExit(f"batch sizes must look like 100 or 100bf16, not {bad}")
    lm = load_lm("smollm2-135m")
    reqs = [c.request for c in load_counterfact(default_bench_file("counterfact"), limit=hi)][lo:hi]
    ed = get_editor_class("alphaedit").create(lm)
    tpl = ed._templates(lm)
    s0 = z_settings(ed.config, lm.device)
    site = lm.arch.block_path(ed.loss_layer_z(lm))  # where AlphaEdit computes z* (block 7 on SmolLM2)
    zvalues.compute_z(lm, reqs[:2], tpl, site, dataclasses.replace(s0, steps=1), progress=False)  # one-time check
    h = lkeys.site_values(lm, reqs, site)  # z* = h + δ: the bf16 difference is reported relative to ‖δ‖
    res, first = [], None
    for spec in specs:
        b, ac = int(spec.removesuffix("bf16")), ("bf16" if spec.endswith("bf16") else "none")
        t = time.perf_counter()
        z, info = zvalues.compute_z(lm, reqs, tpl, site, dataclasses.replace(s0, batch=b, autocast=ac), progress=False)
        dt = time.perf_counter() - t
        rs = sum(i["steps"] + 1 for i in info)
        res.append({"batch": b, "autocast": ac, "s": round(dt, 1), "request_steps": rs,
                    "s_per_request_step": round(dt / rs, 4)})
        if first is None:
            first = z
        else:
            rel = (z - first).norm(dim=1) / (first - h).norm(dim=1)
            res[-1]["vs_first"] = {"max_abs": float((z - first).abs().max()), "mean_rel_to_shift": round(float(rel.mean()), 4),
                                   "max_rel_to_shift": round(float(rel.max()), 4)}
        print(res[-1], flush=True)
    meta = {"records": [lo, hi], "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.machine(), "cpu": cpu_name(), "bf16_matmul_units": list(bf16_units()),
            "fp32_matmul_peak_gflops": round(matmul_peak(torch.float32) / 1e9, 1),  # this VM's speed varies
            "bf16_matmul_peak_gflops": round(matmul_peak(torch.bfloat16) / 1e9, 1)}
    write_json(out_path, {"meta": meta, "runs": res})


if __name__ == "__main__":
    main()
