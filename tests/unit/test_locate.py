"""Locate-then-edit machinery on tiny in-process models: statistics, keys, z*, closed forms, state."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tiny import STATS_TEXT as TEXT
from tiny import locate_requests, strong, tiny_lm

from factedit import EditRequest, FactEditError, get_editor
from factedit.eval.harness import EvalConfig, Runner
from factedit.methods.locate import keys as lkeys
from factedit.methods.locate import postnorm, upper, zstore
from factedit.methods.locate import templates as ltemplates
from factedit.methods.locate import values as zvalues
from factedit.methods.locate.base import z_settings
from factedit.stats import key_stats, null_projector, token_windows
from factedit.types import EvalCase

REQ = locate_requests()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def frozen_tiny(family):
    """A tiny model whose weights need no gradient (z* optimises δ only)."""
    lm = tiny_lm(family)
    lm.model.requires_grad_(False)
    return lm


# ---- statistics -------------------------------------------------------------------------------------
def naive_moment(lm, layer, windows):
    ks = []
    mod = lm.model.get_submodule(lm.arch.mlp_out_path(layer))
    h = mod.register_forward_pre_hook(lambda _m, a: ks.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        for w in windows:
            lm.model(input_ids=torch.tensor([w]))
    h.remove()
    k = torch.cat(ks)
    return (k.T @ k) / k.shape[0], k.shape[0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_pass_statistics_match_per_layer_reference(family):
    lm = tiny_lm(family)
    st = key_stats(lm, [0, 2], [TEXT], tokens=700, max_len=50, batch_size=3)
    windows = token_windows(lm, TEXT, 700, 50)
    assert max(len(w) for w in windows) == 50 and sum(len(w) for w in windows) == 700
    for layer in (0, 2):
        ref, n = naive_moment(lm, layer, windows)
        assert st[layer].count == n == 700
        assert st[layer].mom2_sum.dtype == torch.float64
        assert torch.allclose(st[layer].moment(), ref, rtol=1e-5, atol=1e-6)


def test_statistics_are_cached_and_keyed(monkeypatch):
    lm = tiny_lm("llama")
    a = key_stats(lm, [1], [TEXT], tokens=300, max_len=40)

    def boom(*a, **k):
        raise AssertionError("model ran although the statistics are cached")

    monkeypatch.setattr(lm.model, "forward", boom)
    b = key_stats(lm, [1], [TEXT], tokens=300, max_len=40)
    assert torch.equal(a[1].mom2_sum, b[1].mom2_sum)
    with pytest.raises(AssertionError, match="model ran"):  # another token count is another cache entry
        key_stats(lm, [1], [TEXT], tokens=200, max_len=40)


def test_interrupted_statistics_resume_to_the_same_result():
    full = key_stats(tiny_lm("llama"), [1, 3], [TEXT], tokens=800, max_len=32, batch_size=2)[3].mom2_sum.clone()
    # a second model fingerprint is not needed: clear the cache by using another length cap for both runs
    lm = tiny_lm("llama")
    calls = {"n": 0}
    blk = lm.model.get_submodule(lm.arch.block_path(0))

    def interrupt(*_):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt

    h = blk.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        key_stats(lm, [1, 3], [TEXT], tokens=800, max_len=31, batch_size=2, checkpoint_s=0)
    h.remove()
    resumed = key_stats(lm, [1, 3], [TEXT], tokens=800, max_len=31, batch_size=2)
    fresh = key_stats(tiny_lm("llama"), [1, 3], [TEXT + " "], tokens=800, max_len=31, batch_size=2)
    assert resumed[3].count == fresh[3].count == 800
    assert torch.allclose(resumed[3].mom2_sum, fresh[3].mom2_sum, rtol=1e-10)
    assert full.shape == resumed[3].mom2_sum.shape


def test_statistics_bad_input(tmp_path, cache):
    lm = tiny_lm("llama")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(FactEditError, match="empty"):
        key_stats(lm, [1], str(empty))
    with pytest.raises(FactEditError, match="does not exist"):
        key_stats(lm, [1], str(tmp_path / "nope.txt"))
    with pytest.raises(FactEditError, match="out of range"):
        key_stats(lm, [9], [TEXT])
    st = key_stats(lm, [1], [TEXT], tokens=200, max_len=40)
    # a corrupted cache file (NaN) is reported, naming the file
    from safetensors.torch import save_file

    from factedit.stats import _read_meta

    path = st[1].meta["_path"]
    meta = _read_meta(Path(path))
    save_file({"mom2_sum": torch.full_like(st[1].mom2_sum, float("nan"))}, path, metadata={"factedit": json.dumps(meta)})
    with pytest.raises(FactEditError, match="NaN"):
        key_stats(lm, [1], [TEXT], tokens=200, max_len=40)


def test_null_projector_modes():
    lm = tiny_lm("llama")
    st = key_stats(lm, [1], [TEXT], tokens=600, max_len=60)[1]
    P, info = null_projector(st, 0.05, "relative")
    assert torch.allclose(P @ P, P, atol=1e-5) and torch.allclose(P, P.T, atol=1e-6)
    assert int(round(float(P.trace()))) == info["kept"] > 0
    C = st.moment().float()
    # P removes most of the preserved keys' energy: trace(P C) / trace(C) is the reported energy_through
    assert abs(float((P @ C).trace() / C.trace()) - info["energy_through"]) < 1e-3
    P2, info2 = null_projector(st, float(torch.linalg.eigvalsh(st.moment()).max()) * 0.05, "absolute")
    assert info2["kept"] == info["kept"]
    with pytest.raises(FactEditError, match="unknown null-space mode"):
        null_projector(st, 0.1, "bogus")


# ---- templates, keys, z* ----------------------------------------------------------------------------------
def test_templates_cached_with_seed():
    lm = tiny_lm("llama")
    a = ltemplates.context_templates(lm, [4], 3, seed=7)
    assert a[0] == "{}" and len(a) == 4 and all(t.endswith(". {}") for t in a[1:])
    assert ltemplates.context_templates(lm, [4], 3, seed=7) == a


def test_keys_average_groupwise():
    lm = tiny_lm("llama")
    T = ["{}", "A b . {}", "The c . {}"]
    k = lkeys.compute_keys(lm, REQ[:1], T, [1], "group")[1][0]
    each = [lkeys.compute_keys(lm, REQ[:1], [t], [1], "flat")[1][0] for t in T]
    assert torch.allclose(k, (each[0] + (each[1] + each[2]) / 2) / 2, atol=1e-5)
    flat = lkeys.compute_keys(lm, REQ[:1], T, [1], "flat")[1][0]
    assert torch.allclose(flat, sum(each) / 3, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_key_walker_equals_plain_keys_while_layers_are_edited(family):
    lm = tiny_lm(family)
    T = ["{}", "The Paris . {}", "A b c . {}"]
    walker = lkeys.KeyWalker(lm, REQ, T, "group", batch_size=4)  # 9 texts: three batches
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in (0, 1, 3):
            got = walker.keys(layer)
            want = lkeys.compute_keys(lm, REQ, T, [layer], "group")[layer]
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
            w = lm.model.get_submodule(lm.arch.mlp_out_path(layer)).weight
            w.add_(0.5 * torch.randn_like(w))  # an edit of this layer changes the keys above it
    # llama and gemma3 start mid-stack from the kept block inputs; gpt2 falls back to the plain forward
    assert lkeys.KeyWalker._ok[lm.model] is (family != "gpt2")
    with pytest.raises(FactEditError, match="ascend"):
        walker.keys(1)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_batched_z_equals_one_request_at_a_time(family):
    lm = frozen_tiny(family)
    T = ["{}", "The Paris . {}"]
    site = lm.arch.block_path(2)
    s = zvalues.ZSettings(steps=12, lr=0.5, clamp_norm_factor=4.0, batch=8)
    z, info = zvalues.compute_z(lm, REQ, T, site, s, progress=False)
    single = torch.cat([zvalues.compute_z(lm, [r], T, site, s, progress=False)[0] for r in REQ])
    assert torch.allclose(z, single, rtol=1e-4, atol=1e-4 * float(z.abs().max()))
    slow = zvalues.compute_z(lm, REQ, T, site, zvalues.ZSettings(steps=12, lr=0.5, clamp_norm_factor=4.0, fast=False),
                            progress=False)[0]
    assert torch.allclose(z, slow, rtol=1e-4, atol=1e-4 * float(z.abs().max()))
    # llama and gemma3 run the δ-dependent columns only (prefix keys/values cached); gpt2 falls back
    assert upper.UpperStack._ok[lm.model][2] is (family != "gpt2")
    h0 = lkeys.site_values(lm, REQ, site)
    assert all(i["loss"] >= 0 for i in info)
    # the clamp holds: ‖z − h‖ ≤ 4‖h‖
    assert bool(((z - h0).norm(dim=1) <= 4.0 * h0.norm(dim=1) * (1 + 1e-4)).all())


def test_z_store_reuses_only_for_the_same_weights_and_settings(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FACTEDIT_ZSTAR_CACHE", str(tmp_path / "zs"))
    lm = frozen_tiny("llama")
    T = ["{}", "The Paris . {}"]
    site = lm.arch.block_path(2)
    s = zvalues.ZSettings(steps=6, lr=0.5, clamp_norm_factor=4.0, batch=2)
    real = zvalues.compute_z_batch
    calls = []

    def counting(lm_, reqs, *a):
        calls.append([r.case_id for r in reqs])
        return real(lm_, reqs, *a)

    monkeypatch.setattr(zvalues, "compute_z_batch", counting)
    z1, i1 = zvalues.compute_z(lm, REQ[:2], T, site, s, progress=False, cache=True)
    assert calls == [[1, 2]]
    # request 3 is new; 1 and 2 are read back (another batch size does not change z*), in request order
    z2, i2 = zvalues.compute_z(lm, [REQ[2], REQ[0], REQ[1]], T, site, zvalues.ZSettings(**{**vars(s), "batch": 5}),
                              progress=False, cache=True)
    assert calls == [[1, 2], [3]]
    assert torch.equal(z2[1:], z1)
    assert [i["case"] for i in i2] == [r.label for r in (REQ[2], REQ[0], REQ[1])]
    assert [i.get("stored", False) for i in i2] == [False, True, True]
    assert [i["loss"] for i in i2[1:]] == [i["loss"] for i in i1]
    fresh = zvalues.compute_z(lm, [REQ[2]], T, site, s, progress=False)[0]
    assert torch.allclose(z2[0], fresh[0], rtol=1e-4, atol=1e-4 * float(fresh.abs().max()))  # float32, Adam, kernels
    # other settings, other templates or other weights: computed again
    zvalues.compute_z(lm, REQ[:1], T, site, zvalues.ZSettings(**{**vars(s), "kl_factor": 1.0}), progress=False, cache=True)
    zvalues.compute_z(lm, REQ[:1], ["{}"], site, s, progress=False, cache=True)
    w = lm.model.get_submodule(lm.arch.mlp_out_path(1)).weight
    w00 = w[0, 0].clone()
    with torch.no_grad():
        w[0, 0] += 1e-3
    zvalues.compute_z(lm, REQ[:1], T, site, s, progress=False, cache=True)
    assert calls[3:] == [[1], [1], [1]]  # (calls[2]: the store-less reference above)
    with torch.no_grad():
        w[0, 0] = w00  # the same bytes again (w + 1e-3 - 1e-3 need not be w): the stored z* is found
    zvalues.compute_z(lm, REQ[:1], T, site, s, progress=False, cache=True)
    assert len(calls) == 6
    # a damaged entry is recomputed (with a warning) and replaced
    entry = zstore.ZStore(lm, T, site, vars(s)).path(REQ[0])
    entry.write_bytes(b"not safetensors")
    with caplog.at_level("WARNING"):
        z3 = zvalues.compute_z(lm, REQ[:1], T, site, s, progress=False, cache=True)[0]
    assert len(calls) == 7 and "unreadable" in caplog.text
    assert torch.allclose(z3[0], z1[0], rtol=1e-4, atol=1e-4 * float(z1.abs().max()))
    assert zstore.ZStore(lm, T, site, vars(s)).get(REQ[0]) is not None
    assert not list(entry.parent.glob(".*"))  # no temporary files left behind
    # the probability stop is part of the key when on; off, the key is the one it had before the setting existed
    key = lambda **kw: zstore.ZStore(lm, T, site, {**vars(s), **kw}).path(REQ[0])  # noqa: E731
    old_settings = {k: v for k, v in vars(s).items() if k != "early_stop_prob"}
    assert key() == zstore.ZStore(lm, T, site, old_settings).path(REQ[0])
    assert key(early_stop_prob=0.9) != key()


def test_rows_are_grouped_by_length():
    sizes = [3, 9, 4, 15, 14, 6, 1, 8]
    groups = upper.group_by_length(sizes, overhead=4)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    assert len(groups) > 1
    flat = [sizes[i] for g in groups for i in g]
    assert flat == sorted(sizes)  # contiguous runs of the sorted lengths
    assert upper.group_by_length(sizes, overhead=10_000) == [sorted(range(8), key=lambda i: sizes[i])]


def test_requests_leaving_the_batch_at_different_steps_keep_their_results():
    lm = frozen_tiny("llama")
    T = ["{}", "The Paris . {}"]
    site = lm.arch.block_path(2)
    probe = zvalues.compute_z(lm, REQ, T, site, zvalues.ZSettings(steps=6, lr=0.5), progress=False)[1]
    # a stop threshold between the requests' losses, half-way between two of them so that batch-shape float
    # error cannot put a loss on the other side: some stop early, others run on
    losses = sorted(i["loss"] for i in probe)
    stop = (losses[len(losses) // 2 - 1] + losses[len(losses) // 2]) / 2
    s = zvalues.ZSettings(steps=12, lr=0.5, clamp_norm_factor=4.0, batch=8, early_stop_loss=stop)
    z, info = zvalues.compute_z(lm, REQ, T, site, s, progress=False)
    assert len({i["steps"] for i in info}) > 1
    single = [zvalues.compute_z(lm, [r], T, site, s, progress=False) for r in REQ]
    assert [i["steps"] for i in info] == [x[1][0]["steps"] for x in single]
    zs = torch.cat([x[0] for x in single])
    assert torch.allclose(z, zs, rtol=1e-4, atol=1e-4 * float(z.abs().max()))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_bf16_z_runs_the_mlps_and_head_in_bf16_and_the_rest_in_fp32(family):
    """autocast=bf16: bf16 inside the MLPs and the LM head only, during the steps; z* stays close to fp32's,
    and nothing (hooks, autocast) is left behind, also when a step raises."""
    lm = frozen_tiny(family)
    T = ["{}", "The Paris . {}"]
    site = lm.arch.block_path(1)
    s = zvalues.ZSettings(steps=8, lr=0.5, clamp_norm_factor=4.0, batch=8)
    z32 = zvalues.compute_z(lm, REQ, T, site, s, progress=False)[0]
    blk = lm.model.get_submodule(lm.arch.block_path(2))
    mlp = blk.get_submodule(lm.arch.mlp_out.rpartition(".")[0])
    attn_out = blk.get_submodule(lm.arch.attn_out)
    seen: dict = {"mlp": set(), "attn": set(), "head": set()}

    def record(key):  # the optimisation steps only (grad on); the cached prefix is computed in fp32 under no_grad
        return lambda m, a, o: seen[key].add(o.dtype) if torch.is_grad_enabled() else None

    spy = [mlp.register_forward_hook(record("mlp")), attn_out.register_forward_hook(record("attn")),
           lm.model.get_output_embeddings().register_forward_hook(record("head"))]
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())
    zb = zvalues.compute_z(lm, REQ, T, site, zvalues.ZSettings(**{**vars(s), "autocast": "bf16"}), progress=False)[0]
    for h in spy:
        h.remove()
    assert seen["mlp"] == {torch.bfloat16} and seen["head"] == {torch.bfloat16} and seen["attn"] == {torch.float32}
    h0 = lkeys.site_values(lm, REQ, site)
    rel = (zb - z32).norm(dim=1) / (z32 - h0).norm(dim=1)
    assert zb.dtype == torch.float32 and 0 < float(rel.max()) < 0.1
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules()) == n_hooks - len(spy)

    def boom(m, a, o):
        raise RuntimeError("boom")

    bad = mlp.down_proj if hasattr(mlp, "down_proj") else mlp.c_proj
    h = bad.register_forward_hook(boom)  # raises inside an MLP, after its autocast was entered
    with pytest.raises(RuntimeError, match="boom"):
        zvalues.compute_z(lm, REQ, T, site, zvalues.ZSettings(**{**vars(s), "autocast": "bf16"}), progress=False)
    h.remove()
    assert not torch.is_autocast_enabled("cpu")
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules()) == n_hooks - len(spy)
    assert not [n for n, m in lm.model.named_modules() if "forward" in m.__dict__]  # the pre-cast forwards are gone


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_bf16_weights_cast_once_give_the_same_z_as_autocast_casting_per_call(family, monkeypatch):
    """The pre-cast of the frozen MLP and head weights is a speed-up only: autocast rounds the same fp32
    weight to the same bf16 value on every call, so z* is bit-equal with and without it; the modules
    have their own forward back afterwards."""
    lm = frozen_tiny(family)
    T = ["{}", "The Paris . {}"]
    site = lm.arch.block_path(1)
    s = zvalues.ZSettings(steps=6, lr=0.5, clamp_norm_factor=4.0, batch=8, autocast="bf16")
    calls = []
    head = lm.model.get_output_embeddings()
    h = head.register_forward_pre_hook(lambda m, a: calls.append("forward" in m.__dict__))
    z_once = zvalues.compute_z(lm, REQ, T, site, s, progress=False)[0]
    assert calls and all(calls)  # the head ran with its pre-cast weight
    monkeypatch.setattr(zvalues, "PRECAST_BF16", False)
    calls.clear()
    z_each = zvalues.compute_z(lm, REQ, T, site, s, progress=False)[0]
    h.remove()
    assert calls and not any(calls)
    assert torch.equal(z_once, z_each)
    assert not [n for n, m in lm.model.named_modules() if "forward" in m.__dict__]
    assert head.weight.dtype == torch.float32


def test_early_stop_on_the_target_probability_stops_each_request_once_met():
    """early_stop_prob: a request leaves the batch at the first check where exp(-NLL) reaches the threshold; the
    others run on, unaffected (the same z* as alone); off (0), every request runs the loss rule only."""
    lm = frozen_tiny("llama")
    T = ["{}", "The Paris . {}"]
    site = lm.arch.block_path(2)
    base = zvalues.ZSettings(steps=12, lr=0.5, clamp_norm_factor=4.0, batch=8, early_stop_loss=0.0)
    full = zvalues.compute_z(lm, REQ, T, site, base, progress=False)[1]
    assert all(i["steps"] == 11 for i in full) and all(0 < i["prob"] <= 1 for i in full)
    # a threshold half-way between two requests' final probabilities: some stop early, others never do
    probs = sorted(i["prob"] for i in full)
    p_stop = (probs[len(probs) // 2 - 1] + probs[len(probs) // 2]) / 2
    s = dataclasses.replace(base, early_stop_prob=p_stop)
    z, info = zvalues.compute_z(lm, REQ, T, site, s, progress=False)
    stopped = [i for i in info if i["steps"] < 11]
    assert stopped and len(stopped) < len(info)
    assert all(i["prob"] >= p_stop for i in stopped)
    single = [zvalues.compute_z(lm, [r], T, site, s, progress=False) for r in REQ]
    assert [i["steps"] for i in info] == [x[1][0]["steps"] for x in single]
    assert torch.allclose(z, torch.cat([x[0] for x in single]), rtol=1e-4, atol=1e-4 * float(z.abs().max()))
    with pytest.raises(FactEditError, match="early_stop_prob"):
        zvalues.compute_z(lm, REQ, T, site, dataclasses.replace(base, early_stop_prob=1.5), progress=False)
    with pytest.raises(FactEditError, match="early_stop_prob"):  # refused with the config, before any model work
        get_editor("memit", lm, early_stop_prob=1.5)


def test_autocast_auto_follows_the_hardware_and_the_override(monkeypatch):
    from factedit import hw
    from factedit.methods.locate.base import LocateConfig

    c = LocateConfig()
    assert c.autocast == "auto"
    monkeypatch.setenv("FACTEDIT_NATIVE_BF16", "1")
    assert z_settings(c, "cpu").autocast == "bf16"
    assert z_settings(dataclasses.replace(c, autocast="none"), "cpu").autocast == "none"
    monkeypatch.setenv("FACTEDIT_NATIVE_BF16", "0")
    assert z_settings(c, "cpu").autocast == "none"
    assert z_settings(dataclasses.replace(c, autocast="bf16"), "cpu").autocast == "bf16"
    monkeypatch.setenv("FACTEDIT_NATIVE_BF16", "yes")
    with pytest.raises(FactEditError, match="FACTEDIT_NATIVE_BF16"):
        z_settings(c, "cpu")
    monkeypatch.delenv("FACTEDIT_NATIVE_BF16")
    # detected: bf16 exactly where the CPU lists a native bf16 extension; never on another device type
    monkeypatch.setattr(hw, "bf16_units", lambda: ("avx512_bf16",))
    assert hw.resolve_autocast("auto", "cpu") == "bf16" and hw.resolve_autocast("auto", "meta") == "none"
    monkeypatch.setattr(hw, "bf16_units", lambda: ())
    assert hw.resolve_autocast("auto", "cpu") == "none"
    with pytest.raises(FactEditError, match="autocast"):
        hw.resolve_autocast("fp8", "cpu")


def test_bf16_units_reads_the_cpu_flags():
    from factedit import hw

    units = hw.bf16_units()
    assert set(units) <= {"amx_bf16", "avx512_bf16"}
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if flags:
        assert ("avx512_bf16" in units) == (" avx512_bf16" in flags)


def test_z_lowers_the_target_loss_and_kl_direction_is_a_choice():
    lm = frozen_tiny("llama")
    site = lm.arch.block_path(2)
    s0 = zvalues.ZSettings(steps=1)
    s = zvalues.ZSettings(steps=30, lr=1.0, clamp_norm_factor=10.0)
    before = zvalues.compute_z(lm, REQ, ["{}"], site, s0, progress=False)[1]
    after = zvalues.compute_z(lm, REQ, ["{}"], site, s, progress=False)[1]
    assert all(a["loss"] < b["loss"] - 0.5 for a, b in zip(after, before))
    z1 = zvalues.compute_z(lm, REQ, ["{}"], site, zvalues.ZSettings(steps=8, kl_factor=5.0), progress=False)[0]
    z2 = zvalues.compute_z(lm, REQ, ["{}"], site, zvalues.ZSettings(steps=8, kl_factor=5.0, kl_direction="initial_current"),
                          progress=False)[0]
    assert not torch.allclose(z1, z2)
    with pytest.raises(FactEditError, match="kl_direction"):
        zvalues.compute_z(lm, REQ, ["{}"], site, zvalues.ZSettings(kl_direction="sideways"), progress=False)


# ---- closed forms -----------------------------------------------------------------------------------------
def test_rome_hits_its_value_exactly(corpus):
    lm = tiny_lm("llama")
    ed = get_editor("rome", lm, **strong(corpus, layers=(1,)))
    patch = ed.compute(lm, REQ[:1])
    v_star = zvalues.compute_z(lm, REQ[:1], ed.templates, lm.arch.mlp_out_path(1),
                              z_settings(ed.config, lm.device),
                              progress=False)[0]
    with patch.apply(lm):
        got = lkeys.site_values(lm, REQ[:1], lm.arch.mlp_out_path(1))
    assert torch.allclose(got, v_star, rtol=1e-4, atol=1e-3)
    d = next(iter(patch.deltas.values()))
    assert d.u.shape[1] == 1  # rank one


def test_memit_one_layer_small_lambda_reaches_z(corpus):
    lm = tiny_lm("llama")
    ed = get_editor("memit", lm, **strong(corpus, layers=(2,), mom2_update_weight=1e-6))
    patch = ed.compute(lm, REQ)
    site = lm.arch.block_path(2)
    z = zvalues.compute_z(lm, REQ, ed.templates, site, z_settings(ed.config, lm.device), progress=False)[0]
    h0 = lkeys.site_values(lm, REQ, site)
    with patch.apply(lm):
        h1 = lkeys.site_values(lm, REQ, site)
    # the keys at the bare prompt differ from the template-averaged keys, so only most of the way
    assert float((h1 - z).norm()) < 0.35 * float((h0 - z).norm())
    # the phases of compute are timed and saved with the patch
    assert {"z*", "keys", "solve"} <= set(patch.meta["phase_s"]) and all(v >= 0 for v in patch.meta["phase_s"].values())


@pytest.mark.parametrize("gain", ["gemma", "olmo"])
def test_through_post_norm_reaches_any_reachable_normed_output(gain):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    torch.manual_seed(0)
    d = 16
    norm = Gemma3RMSNorm(d) if gain == "gemma" else Olmo2RMSNorm(d)
    with torch.no_grad():
        w = torch.randn(d) * 3
        w[5] = -1.0 if gain == "gemma" else 0.0  # a zero gain: Gemma's (1 + w), OLMo's w
        norm.weight.copy_(w)
    m = torch.randn(4, d)
    m2 = m + 0.7 * torch.randn(4, d)
    m2[:, 5] = m[:, 5]  # the zero-gain coordinate stays: then n(m2) is reachable from m
    R = (norm(m2) - norm(m)).detach()  # a change the norm can produce
    dm = postnorm.through_post_norm(norm, m, R)
    assert torch.allclose(norm(m + dm.float()), norm(m2), atol=1e-4)
    assert torch.all(dm[:, 5] == 0)  # the zero-gain coordinate is left as it is
    # an unreachable change: the closest output the norm can give (no nearby or far out-projection output
    # gets closer to n(m) + R); all gains non-zero here, so the output's scale is fixed
    with torch.no_grad():
        norm.weight[5] = 2.0
    R = torch.randn(4, d) * 5
    ms = m + postnorm.through_post_norm(norm, m, R).float()
    want = norm(m) + R
    best = (norm(ms) - want).norm(dim=-1)
    with torch.no_grad():
        for scale in (1e-3, 1e-2, 1e-1, 1.0):
            x = ms[:, None] + scale * ms.abs().mean() * torch.randn(4, 300, d)
            assert torch.all((norm(x) - want[:, None]).norm(dim=-1) >= best[:, None] - 1e-4)
    with pytest.raises(FactEditError, match="not an RMS norm"):
        postnorm.through_post_norm(torch.nn.LayerNorm(d), m, R)  # mean-centred: not of the form g ⊙ x / rms(x)


def test_memit_maps_the_residual_through_gemmas_post_mlp_norm(corpus, monkeypatch):
    import dataclasses

    lm = tiny_lm("gemma3")
    assert lm.arch.mlp_post_norm == "post_feedforward_layernorm"
    site = lm.arch.block_path(2)
    # a z* within what one normalised MLP output can reach (it has a fixed scale): a small clamp
    kw = strong(corpus, layers=(2,), mom2_update_weight=1e-6, clamp_norm_factor=0.15)

    def dist(arch):
        monkeypatch.setattr(lm, "arch", arch)
        ed = get_editor("memit", lm, **kw)
        patch = ed.compute(lm, REQ)
        with torch.no_grad():
            z = ed._z(lm, REQ)[0]
        h0 = lkeys.site_values(lm, REQ, site)
        with patch.apply(lm):
            h1 = lkeys.site_values(lm, REQ, site)
        return float((h1 - z).norm() / (h0 - z).norm())

    mapped = dist(lm.arch)
    plain = dist(dataclasses.replace(lm.arch, mlp_post_norm=None))  # MEMIT as published: z* and residual
    # at the block output, taken as they are
    assert mapped < 0.35 and mapped < 0.5 * plain, (mapped, plain)


def test_post_norm_z_is_reachable_and_is_the_block_output_of_the_mlp_value(corpus):
    lm = tiny_lm("gemma3")
    ed = get_editor("memit", lm, **strong(corpus, layers=(2,)))
    with torch.no_grad():
        z, infos = ed._z(lm, REQ)
    mlp, blk = lm.arch.mlp_out_path(2), lm.arch.block_path(2)
    v = zvalues.compute_z(lm, REQ, ed.templates, mlp, z_settings(ed.config, lm.device), progress=False)[0]
    # setting the out-projection's output at the subject to v* gives exactly z* at the block output
    pos = {}

    def put(out, _args):
        out = out.clone()
        out[torch.arange(out.shape[0]), pos["i"]] = v[pos["r"]].to(out.dtype)
        return out

    from factedit.lm.hooks import Trace
    from factedit.lm.tokens import encode, subject_last_index

    got = []
    for r_i, r in enumerate(REQ):
        ids = torch.tensor([encode(lm.tokenizer, r.prompt)])
        pos["i"], pos["r"] = subject_last_index(lm.tokenizer, r.prompt, r.subject, start=r.prompt.index(r.subject)), r_i
        with torch.no_grad(), Trace(lm.model.get_submodule(mlp), retain_output=False, edit_output=put), \
                Trace(lm.model.get_submodule(blk)) as tb:
            lm.model(input_ids=ids)
        got.append(tb.output[0, pos["i"]])
    assert torch.allclose(torch.stack(got), z, rtol=1e-4, atol=1e-4)


def test_alphaedit_update_lies_in_the_null_space(corpus):
    lm = tiny_lm("llama")
    ed = get_editor("alphaedit", lm, **strong(corpus, nullspace_mode="relative", nullspace_threshold=0.05, L2=0.1))
    patch = ed.compute(lm, REQ)
    for layer in (1, 2):
        P, _ = ed.projector(lm, layer)
        d = patch.deltas[f"{lm.arch.mlp_out_path(layer)}.weight"].materialise()  # (out, in)
        assert float((d - d @ P).abs().max()) < 1e-4 * float(d.abs().max())


def test_nse_full_neurons_one_pass_equals_memit(corpus):
    lm = tiny_lm("llama")
    kw = strong(corpus)
    m = get_editor("memit", lm, **kw).compute(lm, REQ)
    n = get_editor("nse", lm, **kw, alpha=0.0, upper_bound=1e9, max_iterations=2, neuron_threshold=1.0).compute(lm, REQ)
    for k in m.deltas:
        assert torch.allclose(m.deltas[k].materialise(), n.deltas[k].materialise(), atol=1e-5)


def test_nse_neuron_selection_leaves_other_columns_untouched(corpus):
    lm = tiny_lm("llama")
    ed = get_editor("nse", lm, **strong(corpus), alpha=0.0, upper_bound=1e9, max_iterations=2, neuron_threshold=0.5)
    patch = ed.compute(lm, REQ)
    d = patch.deltas[f"{lm.arch.mlp_out_path(1)}.weight"].materialise()
    zero_cols = (d.abs().sum(0) == 0).sum()
    assert 0 < int(zero_cols) < d.shape[1]


def test_locate_editors_reject_bad_layers(corpus):
    lm = tiny_lm("gpt2")
    with pytest.raises(FactEditError, match="out of range"):
        get_editor("memit", lm, **strong(corpus, layers=(2, 9))).compute(lm, REQ)
    with pytest.raises(FactEditError, match="exactly one layer"):
        get_editor("rome", lm, **strong(corpus)).compute(lm, REQ)


def test_target_already_the_answer_is_reported(corpus, caplog):
    from factedit.lm.batch import batch_logits, make_batch

    lm = tiny_lm("llama")
    req = None
    for r in REQ:  # find a prompt whose greedy next token is a whole word, and make it the target
        for p in (r.prompt, r.prompt + " the", r.prompt + " a"):
            ids = torch.tensor([lm.tokenizer(p)["input_ids"]])
            word = lm.tokenizer.decode([int(lm.model(input_ids=ids).logits[0, -1].argmax())])
            if word.startswith(" ") and word.strip():
                cand = EditRequest(p, r.subject, word.strip(), case_id=9)
                logits, labels = batch_logits(lm, make_batch(lm, [p], [cand.target_new]))
                if bool(((logits.argmax(-1) == labels) | (labels < 0)).all()):
                    req = cand
                    break
        if req:
            break
    assert req is not None
    with caplog.at_level("WARNING"):
        patch = get_editor("memit", lm, **strong(corpus)).compute(lm, [req])
    assert "already" in caplog.text
    assert all(torch.isfinite(d.materialise()).all() for d in patch.deltas.values())


# ---- sequential state ---------------------------------------------------------------------------------------
def test_compute_alone_does_not_advance_state(corpus):
    lm = tiny_lm("llama")
    ed = get_editor("alphaedit", lm, **strong(corpus, nullspace_mode="relative", nullspace_threshold=0.05))
    p1 = ed.compute(lm, REQ[:2])
    assert ed.cache_c == {} and ed.n_committed == 0
    ed.commit(p1)
    # layer-2 keys depend on the layer-1 edit: C_p holds the keys of the *edited* model
    K = lkeys.compute_keys(lm, REQ[:2], ed.templates, [2], "group")[2].double()
    assert ed.n_committed == 2 and set(ed.cache_c) == {1, 2}
    assert not torch.allclose(ed.cache_c[2], K.T @ K)
    with p1.apply(lm):
        K1 = lkeys.compute_keys(lm, REQ[:2], ed.templates, [2], "group")[2].double()
    assert torch.allclose(ed.cache_c[2], K1.T @ K1, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["alphaedit", "nse", "memit"])
def test_interrupted_sequential_run_resumes_to_the_same_weights(method, corpus, tmp_path):
    cases = [EvalCase(request=r, paraphrase_prompts=(r.prompt,), neighborhood_prompts=(r.prompt,))
             for r in REQ + [EditRequest("Big Ben is in", "Big Ben", "Paris", "London", case_id=4)]]
    kw = strong(corpus, v_steps=6)
    if method == "alphaedit":
        kw.update(nullspace_mode="relative", nullspace_threshold=0.05)
    if method == "nse":
        kw.update(alpha=0.0, upper_bound=1e9)
    ecfg = EvalConfig(ppl_tokens=0, fluency_cases=0)

    def final_weights(out, interrupt_round=None, **extra):
        lm = tiny_lm("llama")
        ed = get_editor(method, lm, **kw, **extra)
        if interrupt_round is not None:
            real = ed.compute
            calls = {"n": 0}

            def flaky(*a, **k):
                calls["n"] += 1
                if calls["n"] == interrupt_round + 1:
                    raise KeyboardInterrupt
                return real(*a, **k)

            ed.compute = flaky
            with pytest.raises(KeyboardInterrupt):
                Runner(lm, ed, cases, bench="counterfact", mode="sequential", out=out, edit_batch=1, eval_cfg=ecfg).run()
            lm = tiny_lm("llama")
            ed = get_editor(method, lm, **kw, **extra)  # a new process: fresh model and editor
        Runner(lm, ed, cases, bench="counterfact", mode="sequential", out=out, edit_batch=1, eval_cfg=ecfg).run()
        from factedit.patch.io import load_patch

        total = {}
        for r in range(4):
            for k, d in load_patch(out / f"rounds/{r:04d}").deltas.items():
                total[k] = total.get(k, 0) + d.materialise()
        return total, ed

    a, ed_a = final_weights(tmp_path / "a", z_cache=False)  # nothing stored: b computes its own z*
    b, ed_b = final_weights(tmp_path / "b", interrupt_round=2)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
    assert ed_a.n_committed == ed_b.n_committed == 4  # the resumed editor restored 2 and committed 2
    state = json.loads((tmp_path / "b" / "editor_state" / "state.json").read_text())
    assert state["round"] == 3 and state["meta"]["n_committed"] == 4


@pytest.mark.parametrize("method", ["alphaedit", "nse"])
def test_a_round_saved_but_not_committed_is_committed_as_saved_on_resume(method, tmp_path, corpus, monkeypatch):
    """The stream protocol: the round's keys (and NSE's original weights) are saved with its patch, so a run
    stopped between saving a round and committing it resumes by committing the saved patch, not recomputing."""
    from factedit.eval.harness import EvalConfig, Runner
    from factedit.patch.io import load_patch
    from factedit.stream import EditStream

    cases = [EvalCase(request=r, neighborhood_prompts=(r.prompt,)) for r in REQ]
    kw = strong(corpus, v_steps=6)
    kw.update({"alphaedit": dict(nullspace_mode="relative", nullspace_threshold=0.05),
               "nse": dict(alpha=0.0, upper_bound=1e9)}[method])
    ecfg = EvalConfig(ppl_tokens=0, fluency_cases=0)

    def run(out, lm, ed):
        return Runner(lm, ed, cases, bench="counterfact", mode="sequential", out=out, edit_batch=1, eval_cfg=ecfg).run()

    lm = tiny_lm("llama")
    ref = get_editor(method, lm, **kw)
    run(tmp_path / "a", lm, ref)
    real = EditStream.commit
    n = {"commits": 0}

    def stop_at_second(self, *a, **k):
        n["commits"] += 1
        if n["commits"] == 2:
            raise KeyboardInterrupt  # round 1's patch is saved, the state is still at round 0
        return real(self, *a, **k)

    monkeypatch.setattr(EditStream, "commit", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", tiny_lm("llama"), get_editor(method, lm, **kw))
    monkeypatch.setattr(EditStream, "commit", real)
    saved = load_patch(tmp_path / "b" / "rounds" / "0001")
    assert any(k.startswith("keys.") for k in saved.commit_data)
    lm2 = tiny_lm("llama")
    ed = get_editor(method, lm2, **kw)
    computed = []
    real_compute = ed.compute
    ed.compute = lambda *a: computed.append(1) or real_compute(*a)
    run(tmp_path / "b", lm2, ed)
    assert len(computed) == 1  # round 2 only: round 1 was committed from its saved patch
    for r in range(3):
        pa, pb = (load_patch(tmp_path / x / "rounds" / f"{r:04d}") for x in ("a", "b"))
        for k in pa.deltas:
            assert torch.allclose(pa.deltas[k].materialise(), pb.deltas[k].materialise(), rtol=1e-5, atol=1e-6), (r, k)
    assert ed.n_committed == ref.n_committed == 3
    for l, c in ref.cache_c.items():
        assert torch.allclose(ed.cache_c[l], c, rtol=1e-6), l


def test_the_projector_is_read_from_disk_once_the_statistics_come_from_the_cache(tmp_path, monkeypatch, corpus):
    """AlphaEdit's projector is cached beside its statistics: a second edit, whose statistics are read from the
    cache, reads the projector too instead of recomputing its eigen-decomposition."""
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    from factedit import stats as statsmod

    calls = []
    real = torch.linalg.eigh
    monkeypatch.setattr(statsmod.torch.linalg, "eigh", lambda C: calls.append(1) or real(C))
    kw = strong(corpus, nullspace_mode="relative", nullspace_threshold=0.05)
    lm = tiny_lm("llama")
    get_editor("alphaedit", lm, **kw, z_cache=False).compute(lm, REQ[:1])
    assert len(calls) == 2  # layers 1 and 2, computed once and saved beside their statistics
    assert len(list((tmp_path / "cache" / "stats").rglob("*--null-relative-0.05.safetensors"))) == 2
    get_editor("alphaedit", lm, **kw, z_cache=False).compute(lm, REQ[1:2])  # a new editor: statistics from disk
    assert len(calls) == 2  # ... and the projectors too


def test_the_z_store_is_shared_across_methods_and_says_so(corpus, caplog):
    import logging

    lm = tiny_lm("llama")
    kw = strong(corpus, v_steps=4)
    first = get_editor("memit", lm, **kw).compute(lm, REQ[:2])
    assert first.meta["z_from_store"] == 0
    with caplog.at_level(logging.INFO):
        second = get_editor("nse", lm, **kw).compute(lm, REQ[:2])  # z* defined the same way, same weights
    assert second.meta["z_from_store"] == 2 and "which MEMIT, AlphaEdit and NSE share" in caplog.text
    third = get_editor("memit", lm, **kw, z_cache=False).compute(lm, REQ[:2])  # switched off: computed here
    assert third.meta["z_from_store"] == 0
