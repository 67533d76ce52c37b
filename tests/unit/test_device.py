"""The same edits and evaluation on a CUDA GPU as on the CPU (skipped where torch sees no GPU; CI has none)."""

import pytest
import torch
from tiny import locate_requests, strong, tiny_lm

from factedit import get_editor
from factedit.eval.harness import EvalConfig, Runner
from factedit.types import EvalCase

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")

REQ = locate_requests()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))


def settings(method, corpus):
    kw = strong(corpus, v_steps=20, z_cache=False)
    if method == "rome":
        kw["layers"] = (1,)
    if method == "alphaedit":
        kw.update(nullspace_mode="relative", nullspace_threshold=0.05, L2=0.1)
    if method == "nse":
        kw.update(alpha=0.0, upper_bound=1e9)
    return kw


def on(lm, device):
    lm.model.to(device)
    return lm


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit", "nse"])
def test_gpu_edit_equals_cpu_edit(method, corpus):
    cpu = get_editor(method, lm := tiny_lm("llama"), **settings(method, corpus)).compute(lm, REQ)
    gpu_lm = on(tiny_lm("llama"), "cuda")
    gpu = get_editor(method, gpu_lm, **settings(method, corpus)).compute(gpu_lm, REQ)
    assert cpu.deltas.keys() == gpu.deltas.keys()
    for k in cpu.deltas:
        a, b = cpu.deltas[k].materialise(), gpu.deltas[k].materialise().cpu()
        assert float((a - b).abs().max()) <= 2e-3 * float(a.abs().max()), k
    # the patch applies to the GPU model (its deltas go to the parameters' device) and reverts
    handle = gpu.apply(gpu_lm)
    assert next(gpu_lm.model.parameters()).device.type == "cuda"
    handle.revert()


def test_gpu_sequential_evaluation_equals_cpu(corpus, tmp_path):
    cases = [EvalCase(request=r, paraphrase_prompts=(r.prompt,), neighborhood_prompts=("Big Ben is in",))
             for r in REQ]
    ecfg = EvalConfig(ppl_tokens=0, fluency_cases=1, gen_length=8)
    out = {}
    for dev in ("cpu", "cuda"):
        lm = on(tiny_lm("llama"), dev)
        ed = get_editor("memit", lm, **settings("memit", corpus))
        out[dev] = Runner(lm, ed, cases, bench="counterfact", mode="sequential", out=tmp_path / dev, edit_batch=2,
                          eval_cfg=ecfg).run()
    for key in ("efficacy", "generalization", "specificity"):
        assert out["cpu"]["post"][key] == pytest.approx(out["cuda"]["post"][key], abs=1e-6), key
