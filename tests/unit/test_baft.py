"""BaFT (basis-gated ReFT), continual LoReFT/BaFT through the stream protocol, and the KnowEdit benchmarks."""

import json

import pytest
import torch
from tiny import tiny_lm

from factedit import EditRequest, EvalCase, FactEditError, get_editor
from factedit.eval.harness import EvalConfig, Runner
from factedit.eval.scoring import score_targets
from factedit.fsutil import read_jsonl
from factedit.methods.reft import BaFTIntervention, LoReFTIntervention, _cv2
from factedit.patch.io import load_patch

REQS = [EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris", case_id=1),
        EditRequest("The capital of Italy is", "Italy", "London", "Rome", case_id=2),
        EditRequest("Toko Yasuda plays the", "Toko Yasuda", "piano", "guitar", case_id=3),
        EditRequest("Apple was founded by", "Apple", "Bill Gates", "Steve Jobs", case_id=4)]
UNRELATED = [("Michel Rocard is a native speaker of", "French"), ("Big Ben is in", "London"),
             ("The Colosseum is in", "Rome"), ("Microsoft was founded by", "Bill Gates"),
             ("The capital of France is", "Paris"), ("Who plays the", "piano")]


@pytest.fixture
def loc_file(tmp_path):
    f = tmp_path / "loc.json"  # CounterFact-format training records: only their locality prompts are read
    f.write_text(json.dumps([{"locality_prompt": p, "locality_ground_truth": a} for p, a in UNRELATED]))
    return f


def baft(lm, loc_file, **kw):
    cfg = dict(layers=(1, 2), rank=4, lr=0.05, steps=60, loc_data=str(loc_file), loc_per_edit=2, batch_size=8)
    return get_editor("baft", lm, **{**cfg, **kw})


def _ivs(seed=0, d=16, r=3):
    g = torch.Generator().manual_seed(seed)
    R = torch.linalg.qr(torch.randn(d, r, generator=g))[0].T.contiguous()  # orthonormal rows
    lo, ba = LoReFTIntervention(d, r), BaFTIntervention(d, r, "constant")
    with torch.no_grad():
        for m in (lo, ba):
            m.R.copy_(R)
            m.W.copy_(torch.randn(r, d, generator=torch.Generator().manual_seed(seed + 1)))
            m.b.copy_(torch.randn(r, generator=torch.Generator().manual_seed(seed + 2)))
        ba.A.copy_(torch.randn(r, d, generator=g))
    return lo, ba


def test_constant_weights_make_baft_loreft():
    lo, ba = _ivs()
    h = torch.randn(2, 5, 16)
    assert torch.equal(ba(h), lo(h))  # s ≡ 1 multiplies by exactly 1.0: bit-equal by design


def test_closed_gates_leave_the_representation_untouched_and_open_gates_give_loreft():
    lo, ba = _ivs()
    ba.gate = "sigmoid"
    h = torch.randn(4, 16)
    with torch.no_grad():
        ba.A.zero_()
        ba.a.fill_(-40.0)  # s = sigmoid(-40) ≈ 4e-18
    assert torch.allclose(ba(h), h, atol=1e-6) and not torch.allclose(lo(h), h, atol=1e-3)
    with torch.no_grad():
        ba.a.fill_(40.0)
    assert torch.allclose(ba(h), lo(h), atol=1e-6)
    ba.gate = "softmax"
    assert torch.allclose(ba.weights(h).sum(-1), torch.ones(4))


def test_an_unknown_gate_is_refused():
    with pytest.raises(FactEditError, match="unknown BaFT gate 'relu'"):
        BaFTIntervention(8, 2, "relu")
    lm = tiny_lm("llama")
    with pytest.raises(FactEditError, match="gate"):
        get_editor("baft", lm, gate="relu", loc_per_edit=0)


def test_a_missing_locality_file_is_refused_before_any_edit(tmp_path):
    lm = tiny_lm("llama")
    with pytest.raises(FactEditError, match="does not exist"):
        get_editor("baft", lm, layers=(1,), loc_data=str(tmp_path / "nope.json"))
    get_editor("baft", lm, layers=(1,), loc_data=str(tmp_path / "nope.json"), loc_per_edit=0)  # no locality term


def test_baft_edits_and_its_gates_are_lower_on_unrelated_prompts(loc_file):
    lm = tiny_lm("llama")
    ed = baft(lm, loc_file)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    patch = ed.compute(lm, REQS)
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())
    new = [s.nll for s in score_targets(lm, [r.prompt for r in REQS], [r.target_new for r in REQS])]
    with patch.apply(lm):
        post = [s.nll for s in score_targets(lm, [r.prompt for r in REQS], [r.target_new for r in REQS])]
    assert all(b < a for a, b in zip(new, post))
    # the mechanism: mean basis weight at the last prompt position of the edits above that of unrelated prompts
    from factedit.lm.tokens import encode_target

    def gate_mean(prompts):
        vals = []
        for p in prompts:
            ids = torch.tensor([encode_target(lm.tokenizer, p, " x")[0]])
            hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
            for layer, m in zip((1, 2), patch.modules):
                vals.append(float(m.weights(hs[layer + 1][0, -1]).mean().detach()))
        return sum(vals) / len(vals)

    assert gate_mean([r.prompt for r in REQS]) > gate_mean([p for p, _ in UNRELATED]) + 0.1
    assert patch.meta["basis_usage"] and patch.commit_data["usage"].shape == (2, 4)


def test_baft_patch_saves_loads_and_reverts_bit_exactly(tmp_path, loc_file):
    lm = tiny_lm("llama")
    patch = baft(lm, loc_file, steps=5).compute(lm, REQS[:2])
    patch.save(tmp_path / "p")
    back = load_patch(tmp_path / "p")
    assert back.method == "baft" and back.modules[0].gate == "sigmoid"
    for a, b in zip(patch.modules, back.modules):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    ids = torch.tensor([[5, 6, 7, 8]])
    base = lm.model(input_ids=ids).logits
    with back.apply(lm):
        edited = lm.model(input_ids=ids).logits
    assert not torch.equal(base, edited) and torch.equal(base, lm.model(input_ids=ids).logits)


def test_load_balance_is_the_squared_coefficient_of_variation():
    assert float(_cv2(torch.tensor([2.0, 2.0, 2.0]))) == 0.0
    assert float(_cv2(torch.tensor([3.0, 1.0]))) == pytest.approx(0.25)


def test_continual_usage_carries_into_the_next_rounds_balance(loc_file):
    lm = tiny_lm("llama")
    ed = baft(lm, loc_file, continual=True, steps=3, load_balance=1.0)
    p1, h1 = ed.apply(lm, REQS[:2])
    assert ed.rounds == 1 and torch.equal(ed.usage, p1.commit_data["usage"])
    p2, h2 = ed.apply(lm, REQS[2:])
    assert ed.rounds == 2 and torch.allclose(ed.usage, p1.commit_data["usage"] + p2.commit_data["usage"])
    assert p2.meta["carry"] == "baft:continual" and p2.meta["round"] == 1
    h2.revert()
    h1.revert()


@pytest.mark.parametrize("method", ["loreft", "baft"])
def test_a_carried_round_replaces_the_previous_one_and_its_revert_restores_it(method, loc_file):
    lm = tiny_lm("llama")
    kw = dict(layers=(1,), rank=4, lr=0.05, steps=5, continual=True)
    ed = baft(lm, loc_file, **kw) if method == "baft" else get_editor("loreft", lm, **kw)
    ids = torch.tensor([[5, 6, 7, 8]])
    base = lm.model(input_ids=ids).logits
    p1, h1 = ed.apply(lm, REQS[:2])
    one = lm.model(input_ids=ids).logits
    p2 = ed.compute(lm, REQS[2:])
    assert torch.equal(lm.model(input_ids=ids).logits, one)  # computing round 2 leaves round 1 installed
    # round 2 started from round 1's module and trained on: not the same module
    assert not all(torch.equal(a, b) for a, b in zip(p1.tensors().values(), p2.tensors().values()))
    h2 = p2.apply(lm)
    assert not torch.equal(lm.model(input_ids=ids).logits, one)
    h2.revert()
    assert torch.equal(lm.model(input_ids=ids).logits, one)
    h1.revert()
    assert torch.equal(lm.model(input_ids=ids).logits, base)
    # round 2 applied after round 1 acts alone: equal to applying it on the unedited model
    h1 = p1.apply(lm)
    h2 = p2.apply(lm)
    stacked = lm.model(input_ids=ids).logits
    h2.revert()
    h1.revert()
    with p2.apply(lm):
        alone = lm.model(input_ids=ids).logits
    assert torch.equal(stacked, alone)


def _cases():
    return [EvalCase(request=r, paraphrase_prompts=(f"Where is it ? {r.prompt}",),
                     neighborhood_prompts=(p,), generation_prompts=(r.prompt,))
            for r, (p, _) in zip(REQS, UNRELATED)]


def _run(tmp_path, name, method, loc_file, **kw):
    lm = tiny_lm("llama")
    ed = (baft(lm, loc_file, continual=True, steps=8) if method == "baft"
          else get_editor("loreft", lm, layers=(1, 2), rank=4, lr=0.05, steps=8, continual=True))
    cfg = EvalConfig(batch_size=4, ppl_tokens=0, fluency_cases=0)
    return Runner(lm, ed, _cases(), bench="counterfact", mode="sequential", out=tmp_path / name, eval_cfg=cfg,
                  edit_batch=1, **kw).run()


@pytest.mark.parametrize("method", ["loreft", "baft"])
def test_an_interrupted_continual_stream_resumes_to_the_same_final_module(tmp_path, monkeypatch, loc_file, method):
    full = _run(tmp_path, "full", method, loc_file)
    from factedit.methods import reft

    calls = {"n": 0}
    orig = reft.LoReFTEditor._train

    def flaky(self, lm, reqs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return orig(self, lm, reqs)

    monkeypatch.setattr(reft.LoReFTEditor, "_train", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "resumed", method, loc_file)
    resumed = _run(tmp_path, "resumed", method, loc_file)
    assert calls["n"] == 5  # rounds 0 and 1 were read back, not recomputed
    last_full = load_patch(tmp_path / "full" / "rounds" / "0003")
    last_res = load_patch(tmp_path / "resumed" / "rounds" / "0003")
    assert all(torch.equal(last_full.tensors()[k], v) for k, v in last_res.tensors().items())
    assert resumed["post"] == full["post"]
    state = json.loads((tmp_path / "resumed" / "editor_state" / "state.json").read_text())
    assert state["meta"]["rounds"] == 4 and len(state["chain"]) == 4


# ---- KnowEdit ---------------------------------------------------------------------------------------------------
KE = [
    {"subject": "Eiffel Tower", "prompt": "The Eiffel Tower is in", "target_new": "Rome", "ground_truth": "Paris",
     "portability": {"Reasoning": [{"prompt": "The Eiffel Tower is in the country", "ground_truth": "Italy"}],
                     "Subject_Aliasing": [{"prompt": "La Tour Eiffel is in", "ground_truth": "Rome"}]},
     "locality": {"Relation_Specificity": [{"prompt": "The Eiffel Tower was built by", "ground_truth": "Gustave"}],
                  "Forgetfulness": [{"prompt": "Big Ben is in", "ground_truth": [["London", "LDN"]]}]}},
    {"text": "This is a passage about toko yasuda. Toko Yasuda is a musician.", "concept": "toko yasuda",
     "labels": "She plays the piano.",
     "locality": {"Relation_Specificity": [{"prompt": "The occupation of toko yasuda is", "ground_truth": ["musician"]}]}},
]


def test_knowedit_records_of_every_format_load(tmp_path):
    from factedit.data.knowedit import load_knowedit

    f = tmp_path / "ke.json"
    f.write_text(json.dumps(KE))
    cf, bio = load_knowedit(f)
    assert cf.request.target_true == "Paris" and cf.locality[1] == ("Big Ben is in", "London")
    assert cf.locality_kinds == ("Relation_Specificity", "Forgetfulness")
    assert cf.portability[0] == ("Reasoning", "The Eiffel Tower is in the country", "Italy")
    assert bio.request.target_new == "She plays the piano." and bio.request.subject == "toko yasuda"
    assert bio.generation_prompts == (bio.request.prompt,)
    bad = [dict(KE[0], portability={"Reasoning": [{"prompt": "x"}]})]
    f.write_text(json.dumps(bad))
    with pytest.raises(FactEditError, match=r"ke.json\[0\] portability.Reasoning\[0\]: missing field 'ground_truth'"):
        load_knowedit(f)


def test_knowedit_metrics_per_kind_and_their_mean(tmp_path):
    from factedit.data.knowedit import load_knowedit
    from factedit.eval.benches import get_benchmark

    f = tmp_path / "ke.json"
    f.write_text(json.dumps(KE[:1]))
    case = load_knowedit(f)[0]
    b = get_benchmark("knowedit-wiki_counterfact")
    groups = [g for g, *_ in b.probes(case)]
    assert groups == ["rewrite", "portability:Reasoning", "portability:Subject_Aliasing",
                      "locality:Relation_Specificity", "locality:Forgetfulness"]
    x = lambda acc, am: {"nll": 1.0, "acc": acc, "argmax": am}  # noqa: E731
    rec = {"rewrite": [x(1.0, [1])], "portability:Reasoning": [x(0.0, [1])],
           "portability:Subject_Aliasing": [x(0.5, [1, 2])],
           "locality:Relation_Specificity": [x(0.0, [1, 2])], "locality:Forgetfulness": [x(0.0, [3])]}
    pre = {"raw": {"locality:Relation_Specificity": [x(0.0, [1, 5])], "locality:Forgetfulness": [x(0.0, [3])]}}
    m = b.metrics(rec, pre)
    assert m["efficacy"] == 1.0 and m["portability"] == 0.25 and m["portability_Subject_Aliasing"] == 0.5
    assert m["locality_Relation_Specificity"] == 0.5 and m["locality_Forgetfulness"] == 1.0 and m["locality"] == 0.75


def test_knowedit_eval_runs_end_to_end(tmp_path, loc_file):
    from factedit.data.knowedit import load_knowedit

    f = tmp_path / "ke.json"
    f.write_text(json.dumps(KE))
    lm = tiny_lm("llama")
    cfg = EvalConfig(batch_size=4, ppl_tokens=0, fluency_cases=2, gen_length=6)
    s = Runner(lm, baft(lm, loc_file, steps=10), load_knowedit(f), bench="knowedit-wiki_counterfact", mode="batch",
               out=tmp_path / "run", eval_cfg=cfg).run()
    for k in ("efficacy", "portability", "locality"):
        assert k in s["post"], k
    assert "fluency" in s["post"]
    recs = read_jsonl(tmp_path / "run" / "cases.jsonl")
    assert "locality_Forgetfulness" in recs[0]["post"] and "portability" not in recs[1]["post"]


def test_constant_gates_train_as_loreft():
    """Same seed, settings and no BaFT terms: BaFT with constant gates starts from LoReFT's R, W, b and trains the
    same loss, so it ends at the same module (float32, the same ops in the same order: close to rounding)."""
    lm = tiny_lm("llama")
    kw = dict(layers=(1, 2), rank=4, lr=0.05, steps=10)
    lo = get_editor("loreft", lm, **kw).compute(lm, REQS)
    ba = get_editor("baft", lm, **kw, gate="constant", loc_per_edit=0, load_balance=0).compute(lm, REQS)
    for a, b in zip(lo.modules, ba.modules):
        for name in ("R", "W", "b"):
            x, y = getattr(a, name), getattr(b, name)
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-5), name
