"""z* batch size: seconds per request-step for one round of requests, batch sizes interleaved.

    python bench/zstar_batch.py 100,32,100,32 100 200 bench/results/zstar_batch.json

Computes z* (AlphaEdit's preset z* settings and site, the unedited SmolLM2-135M, no z* store)
for the CounterFact-edit records [LO, HI) once per listed batch size, in the listed order, in one
process: alternating the sizes spreads this VM's drift over both. The one-time mid-stack check runs
before the timed calls. The result per batch size is the same within float tolerance (printed). The
JSON records the fp32 matmul peak measured at the end: this VM's speed varies by up to 1.5x between days.
"""

import dataclasses
import json
import platform
import sys
import time

import torch

from factedit.data import default_bench_file, load_counterfact
from factedit.lm.load import load_lm
from factedit.locate import common
from factedit.methods.locate import _z_settings
from factedit.registry import get_editor_class
from zstar_speed import cpu_name, matmul_peak  # bench/zstar_speed.py, beside this script


def main():
    sizes, lo, hi, out_path = [int(x) for x in sys.argv[1].split(",")], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    lm = load_lm("smollm2-135m")
    reqs = [c.request for c in load_counterfact(default_bench_file("counterfact"), limit=hi)][lo:hi]
    ed = get_editor_class("alphaedit").create(lm)
    tpl = ed._templates(lm)
    s0 = _z_settings(ed.config)
    site = lm.arch.block_path(ed.loss_layer_z(lm))  # where AlphaEdit computes z* (block 7 on SmolLM2)
    common.compute_z(lm, reqs[:2], tpl, site, dataclasses.replace(s0, steps=1), progress=False)  # one-time check
    res, first = [], None
    for b in sizes:
        t = time.perf_counter()
        z, info = common.compute_z(lm, reqs, tpl, site, dataclasses.replace(s0, batch=b), progress=False)
        dt = time.perf_counter() - t
        rs = sum(i["steps"] + 1 for i in info)
        res.append({"batch": b, "s": round(dt, 1), "request_steps": rs, "s_per_request_step": round(dt / rs, 4)})
        print(res[-1], flush=True)
        if first is None:
            first = z
        else:
            print("  max |z - z(first size)|:", float((z - first).abs().max()))
    meta = {"records": [lo, hi], "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.machine(), "cpu": cpu_name(),
            "fp32_matmul_peak_gflops": round(matmul_peak(torch.float32) / 1e9, 1)}  # this VM's speed varies
    with open(out_path, "w") as f:
        json.dump({"meta": meta, "runs": res}, f, indent=1)


if __name__ == "__main__":
    main()
