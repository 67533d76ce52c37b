import json

import pytest
import torch
from tiny import tiny_lm

from factedit import FactEditError
from factedit.errors import FingerprintMismatch
from factedit.lm.arch import Site
from factedit.methods.reft import LoReFTIntervention
from factedit.patch.io import load_patch
from factedit.patch.modules import ModulePatch, Placement, position_mask
from factedit.patch.weights import Delta, WeightPatch


def _state(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _wpatch(lm, factored=False):
    name = f"{lm.arch.mlp_out_path(1)}.weight"
    shape = dict(lm.model.named_parameters())[name].shape
    g = torch.Generator().manual_seed(0)
    d = (Delta(u=torch.randn(shape[0], 2, generator=g), v=torch.randn(shape[1], 2, generator=g)) if factored
         else Delta(dense=torch.randn(*shape, generator=g) * 0.1))
    return WeightPatch(method="test", config={}, base_fingerprint=lm.fingerprint, deltas={name: d}), name


@pytest.mark.parametrize("factored", [False, True])
def test_weight_patch_apply_revert_is_bit_exact(factored):
    lm = tiny_lm("llama")
    before = _state(lm)
    patch, name = _wpatch(lm, factored)
    h = patch.apply(lm)
    p = dict(lm.model.named_parameters())[name]
    assert torch.allclose(p, before[name] + patch.deltas[name].materialise())
    h.revert()
    assert _same(before, _state(lm))
    h.revert()  # idempotent
    assert _same(before, _state(lm))


def test_weight_patch_revert_is_exact_in_bf16():
    lm = tiny_lm("llama")
    lm.model.to(torch.bfloat16)
    before = _state(lm)
    patch, _ = _wpatch(lm)
    with patch.apply(lm):
        pass
    assert _same(before, _state(lm))


def test_merge_keeps_the_change():
    lm = tiny_lm("qwen2")
    before = _state(lm)
    patch, name = _wpatch(lm)
    h = patch.apply(lm)
    h.merge()
    h.revert()  # no-op after merge
    assert not torch.equal(before[name], dict(lm.model.named_parameters())[name])


def test_save_load_roundtrip_and_incomplete_folders(tmp_path):
    lm = tiny_lm("gpt2")
    patch, name = _wpatch(lm, factored=True)
    patch.save(tmp_path / "p")
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["base_fingerprint"] == lm.fingerprint and m["kind"] == "weights"
    back = load_patch(tmp_path / "p")
    assert torch.equal(back.deltas[name].materialise(), patch.deltas[name].materialise())
    (tmp_path / "p" / "tensors.safetensors").unlink()
    with pytest.raises(FactEditError, match="incomplete: tensors.safetensors is missing"):
        load_patch(tmp_path / "p")
    with pytest.raises(FactEditError, match="does not exist"):
        load_patch(tmp_path / "nope")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "manifest.json").write_text("{")
    (tmp_path / "q" / "tensors.safetensors").write_bytes(b"junk")
    with pytest.raises(FactEditError, match="not valid JSON"):
        load_patch(tmp_path / "q")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_fingerprint_mismatch_refused_unless_forced():
    lm, other = tiny_lm("llama"), tiny_lm("mistral")
    patch, _ = _wpatch(lm)
    patch.deltas = {}
    with pytest.raises(FingerprintMismatch, match="--force"):
        patch.apply(other)
    patch.apply(other, force=True).revert()


def test_weight_patch_rejects_unknown_parameter_before_touching_model():
    lm = tiny_lm("llama")
    before = _state(lm)
    patch, name = _wpatch(lm)
    patch.deltas["model.nope.weight"] = Delta(dense=torch.zeros(2, 2))
    with pytest.raises(FactEditError, match="model.nope.weight"):
        patch.apply(lm)
    assert _same(before, _state(lm))


def test_position_masks():
    lens = torch.tensor([2, 4])
    m = position_mask(lens, 2, 5, "last", "cpu")
    assert m.nonzero().tolist() == [[0, 1], [1, 3]]
    assert position_mask(lens, 2, 5, "first_last", "cpu").sum() == 4
    assert position_mask(lens, 2, 5, "all", "cpu").sum() == 6
    assert position_mask(None, 2, 1, "last", "cpu") is None  # a decode step
    assert position_mask(None, 1, 3, "last", "cpu").nonzero().tolist() == [[0, 2]]


def test_module_patch_changes_only_chosen_positions_and_reverts(tmp_path):
    lm = tiny_lm("llama")
    mod = LoReFTIntervention(lm.hidden_size, 2)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_()
    patch = ModulePatch(method="t", config={}, base_fingerprint=lm.fingerprint, placements=[Placement(Site("block_output", 1), "last")], modules=[mod])
    ids = torch.tensor([lm.tokenizer("The capital of Italy is")["input_ids"]])
    base = lm.model(input_ids=ids).logits
    with patch.apply(lm):
        edited = lm.model(input_ids=ids).logits
        patch.save(tmp_path / "m")
        with load_patch(tmp_path / "m").apply(lm):
            pass
    # causal: positions before the last are untouched, the last one changes
    assert torch.allclose(base[0, :-1], edited[0, :-1], atol=1e-6)
    assert not torch.allclose(base[0, -1], edited[0, -1])
    assert torch.equal(lm.model(input_ids=ids).logits, base)
    loaded = load_patch(tmp_path / "m")
    with loaded.apply(lm):
        assert torch.allclose(lm.model(input_ids=ids).logits, edited, atol=1e-6)
