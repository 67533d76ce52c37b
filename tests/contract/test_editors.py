"""One table of contracts over every editor x tiny architecture."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from tiny import CORPUS, FAMILIES, tiny_lm

from factedit import EditRequest, FactEditError, get_editor
from factedit.errors import FingerprintMismatch
from factedit.eval.scoring import score_targets
from factedit.patch.io import load_patch

# Strong settings: the tiny random models need large steps to learn anything in a few iterations.
_TMP = Path(tempfile.mkdtemp(prefix="factedit-contract-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)  # its statistics cache: nothing left in /tmp
(_TMP / "corpus.txt").write_text("\n\n".join(CORPUS * 20))
(_TMP / "loc.json").write_text('[{"locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": '
                               '"French"}, {"locality_prompt": "Apple was founded by", "locality_ground_truth": "Steve Jobs"}]')
# Locate-then-edit settings under which tiny random models move (large clamp, small λ, few templates).
_LOCATE = dict(layers=(1, 2), mom2_corpus=str(_TMP / "corpus.txt"), mom2_tokens=1500, mom2_max_len=64,
               templates_per_length=2, template_lengths=(4,), v_steps=25, v_lr=1.0, clamp_norm_factor=10.0,
               mom2_update_weight=1.0)
METHODS = {
    "ft": dict(layer=1, lr=0.05, norm_constraint=1.0, steps=40),
    "loreft": dict(layers=(1, 2), rank=4, lr=0.05, steps=80),
    "baft": dict(layers=(1, 2), rank=4, lr=0.1, steps=80, loc_data=str(_TMP / "loc.json"), loc_per_edit=1),
    "rome": {**_LOCATE, "layers": (1,)},
    "memit": _LOCATE,
    "alphaedit": {**_LOCATE, "nullspace_mode": "relative", "nullspace_threshold": 0.5, "L2": 0.1},
    "nse": {**_LOCATE, "alpha": 0.0, "upper_bound": 1e9},
}
TRAINED = ("ft", "loreft", "baft")  # methods trained on the target NLL (BaFT adds locality terms): the new target must win
REQUESTS = [
    EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris", case_id=1),
    EditRequest("The capital of Italy is", "Italy", "London", "Rome", case_id=2),
    EditRequest("Toko Yasuda plays the", "Toko Yasuda", "piano", "guitar", case_id=3),
]
# Every family for the trained editors and for MEMIT (whose machinery ROME/AlphaEdit/NSE share); the
# other closed forms on a linear-layout and a Conv1D-layout family.
CASES = [(m, f) for m in METHODS for f in (FAMILIES if m in ("ft", "loreft", "baft", "memit") else ["llama", "gpt2"])]


def _state(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _new_nll(lm):
    return [t.nll for t in score_targets(lm, [r.prompt for r in REQUESTS], [r.target_new for r in REQUESTS])]


def _margins(lm):
    new = score_targets(lm, [r.prompt for r in REQUESTS], [r.target_new for r in REQUESTS])
    true = score_targets(lm, [r.prompt for r in REQUESTS], [r.target_true for r in REQUESTS])
    return [t.nll - n.nll for n, t in zip(new, true)]  # > 0 means P(new) > P(true)


@pytest.fixture(scope="module")
def computed():
    """Compute each (method, family) patch once; the tests below check its contracts."""
    out = {}
    old = os.environ.get("FACTEDIT_CACHE")
    os.environ["FACTEDIT_CACHE"] = str(_TMP / "cache")  # tiny-model statistics stay out of the user cache
    for m, f in CASES:
        lm = tiny_lm(f)
        before = _state(lm)
        grads = [p.requires_grad for p in lm.model.parameters()]
        patch = get_editor(m, lm, **METHODS[m]).compute(lm, REQUESTS)
        out[(m, f)] = (lm, before, grads, patch)
    if old is None:
        os.environ.pop("FACTEDIT_CACHE")
    else:
        os.environ["FACTEDIT_CACHE"] = old
    return out


@pytest.mark.parametrize("method,family", CASES)
def test_compute_is_pure(computed, method, family):
    lm, before, grads, _ = computed[(method, family)]
    assert _same(before, _state(lm))
    assert [p.requires_grad for p in lm.model.parameters()] == grads
    assert not lm.model.training


@pytest.mark.parametrize("method,family", CASES)
def test_apply_then_revert_is_bit_exact(computed, method, family):
    lm, before, _, patch = computed[(method, family)]
    ids = torch.tensor([lm.tokenizer(REQUESTS[0].prompt)["input_ids"]])
    base = lm.model(input_ids=ids).logits
    h = patch.apply(lm)
    assert not torch.equal(lm.model(input_ids=ids).logits, base)
    h.revert()
    assert _same(before, _state(lm))
    assert torch.equal(lm.model(input_ids=ids).logits, base)


@pytest.mark.parametrize("method,family", CASES)
def test_edit_makes_new_target_win(computed, method, family):
    lm, _, _, patch = computed[(method, family)]
    pre = _margins(lm) if method in TRAINED else _new_nll(lm)
    with patch.apply(lm):
        post = _margins(lm) if method in TRAINED else _new_nll(lm)
    if method in TRAINED:
        # P(new) > P(true) for every edited fact, and the total margin grew
        assert all(b > 0 for b in post), (pre, post)
        assert sum(post) > sum(pre) + 1.0, (pre, post)
    else:
        # closed-form editors on random tiny models (z* cannot reach the target from the subject
        # position alone): the new targets become more likely in total
        assert sum(post) < sum(pre) - 0.5, (pre, post)


@pytest.mark.parametrize("method,family", CASES)
def test_save_load_apply_gives_same_outputs(computed, method, family, tmp_path):
    lm, _, _, patch = computed[(method, family)]
    patch.save(tmp_path / "p")
    loaded = load_patch(tmp_path / "p")
    assert loaded.method == method and loaded.requests == REQUESTS
    ids = torch.tensor([lm.tokenizer(REQUESTS[1].prompt)["input_ids"]])
    with patch.apply(lm):
        a = lm.model(input_ids=ids).logits
    with loaded.apply(lm):
        b = lm.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_patch_refuses_another_model(computed, method):
    _, _, _, patch = computed[(method, "llama")]
    other = tiny_lm("qwen2")
    with pytest.raises(FingerprintMismatch):
        patch.apply(other)


@pytest.mark.parametrize("method", METHODS)
def test_malformed_requests_fail_before_model_work(method, monkeypatch):
    lm = tiny_lm("llama")
    editor = get_editor(method, lm, **METHODS[method])

    def boom(*a, **k):
        raise AssertionError("model ran before validation")

    monkeypatch.setattr(lm.model, "forward", boom)
    with pytest.raises(FactEditError, match="no edit requests"):
        editor.compute(lm, [])
    with pytest.raises(FactEditError, match="request #1: expected EditRequest"):
        editor.compute(lm, [REQUESTS[0], {"prompt": "x"}])


def test_out_of_range_layers_are_rejected():
    lm = tiny_lm("gpt2")
    with pytest.raises(FactEditError, match="out of range"):
        get_editor("ft", lm, layer=7).compute(lm, REQUESTS[:1])
    with pytest.raises(FactEditError, match="out of range"):
        get_editor("loreft", lm, layers="1,9").compute(lm, REQUESTS[:1])


def _enum_keys(cls):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls.Config, include_extras=True)
    return [f.name for f in dataclasses.fields(cls.Config) if typing.get_origin(hints[f.name]) is typing.Literal]


@pytest.mark.parametrize("method", sorted(__import__("factedit.registry", fromlist=["x"]).list_methods()))
def test_a_bad_enum_value_is_refused_before_the_model_loads(method, tmp_path, monkeypatch):
    from factedit import cli
    from factedit.registry import get_editor_class

    cls = get_editor_class(method)
    keys = _enum_keys(cls)
    if method != "ft":  # FT-L has no enum-like key; every other method has at least one
        assert keys, method

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("factedit.lm.load.load_lm", no_model)
    for key in keys:
        out = tmp_path / f"run-{key}"
        argv = ["eval", "--method", method, "--bench", "counterfact", "--limit", "1", "--set", f"{key}=sideways",
                "--out", str(out)]
        assert cli.main(argv) == 2, key
        assert not out.exists()
    import dataclasses
    import typing

    from factedit.config import POSITIVE

    hints = typing.get_type_hints(cls.Config, include_extras=True)
    positive = [f.name for f in dataclasses.fields(cls.Config) if POSITIVE in getattr(hints[f.name], "__metadata__", ())]
    assert positive, method  # every method has a positive rate, step count or size
    with pytest.raises(FactEditError, match="out of range"):  # a numeric domain too
        get_editor(method, None, **{positive[0]: 0})
