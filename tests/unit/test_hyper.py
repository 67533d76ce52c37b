"""The hyper-network family's building blocks: capture of keys / value gradients, and aggregation."""

import pytest
import torch
from tiny import locate_requests, tiny_lm

from factedit import FactEditError
from factedit.lm.batch import make_batch
from factedit.methods.hyper.aggregate import mend_sum, ridge_solve, value_differences
from factedit.methods.hyper.capture import capture

REQ = locate_requests()


def _reference_grad(lm, path):
    """∇_W of Σ_facts mean target NLL by autograd on the weight itself (module layout)."""
    w = lm.model.get_submodule(path).weight
    w.requires_grad_(True)
    b = make_batch(lm, [r.prompt for r in REQ], [r.target_new for r in REQ])
    logp = torch.log_softmax(lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float(), -1)
    valid = b.labels >= 0
    tok = logp.gather(-1, b.labels.clamp(min=0)[..., None])[..., 0] * valid
    (-(tok.sum(1) / valid.sum(1)).sum()).backward()
    g = w.grad.detach().clone()
    w.grad = None
    w.requires_grad_(False)
    return g


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_captured_keys_and_value_gradients_sum_to_the_weight_gradient(family):
    lm = tiny_lm(family)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    paths = [lm.arch.mlp_out_path(1), lm.arch.mlp_out_path(2)]
    cap = capture(lm, REQ, paths, tokens="all")
    assert all(p.grad is None for p in lm.model.parameters())  # capture leaves no gradient on the model
    for path in paths:
        U, G = cap.U[path], cap.G[path]  # (n, d_in), (n, d_out)
        want = _reference_grad(lm, path)
        got = G.T @ U if lm.arch.layout == "linear" else U.T @ G  # Σ_j g_j u_jᵀ in the module's layout
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max())), path


def test_answer_rows_are_the_target_predicting_positions_and_batching_does_not_change_them():
    lm = tiny_lm("llama")
    path = lm.arch.mlp_out_path(2)
    ans = capture(lm, REQ, [path], tokens="ans", batch_size=1)
    b = make_batch(lm, [r.prompt for r in REQ], [r.target_new for r in REQ])
    assert ans.n_rows == int(b.target_lens.sum())
    assert ans.fact.tolist() == [i for i, n in enumerate(b.target_lens.tolist()) for _ in range(n)]
    together = capture(lm, REQ, [path], tokens="ans", batch_size=3)  # other padding, other batch
    assert torch.allclose(ans.U[path], together.U[path], rtol=1e-4, atol=1e-5)
    assert torch.allclose(ans.G[path], together.G[path], rtol=1e-4, atol=1e-6 * float(ans.G[path].abs().max()))
    everything = capture(lm, REQ, [path], tokens="all", batch_size=3)
    assert everything.n_rows == int(b.attention_mask.sum()) > ans.n_rows
    with pytest.raises(FactEditError, match="unknown token set"):
        capture(lm, REQ, [path], tokens="some")


def test_ridge_solve_primal_equals_dual_and_solves_the_normal_equation():
    g = torch.Generator().manual_seed(0)
    for n, d_in, d_out in [(5, 12, 7), (20, 8, 3)]:
        U, D = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
        lam = 0.3
        S_p, S_d = ridge_solve(U, D, lam, "primal"), ridge_solve(U, D, lam, "dual")
        assert torch.allclose(S_p, S_d, rtol=1e-9, atol=1e-12)
        Ud, Dd = U.double(), D.double()
        resid = (Ud.T @ Ud + lam * torch.eye(d_in, dtype=torch.float64)) @ S_p - Ud.T @ Dd
        assert float(resid.abs().max()) < 1e-10
    # fewer rows than inputs and a vanishing λ: every token's value change is realised exactly
    U, D = torch.randn(4, 10, generator=g), torch.randn(4, 6, generator=g)
    S = ridge_solve(U, D, 1e-9)
    assert torch.allclose(U.double() @ S, D.double(), atol=1e-6)
    with pytest.raises(FactEditError, match="positive"):
        ridge_solve(U, D, 0.0)


def test_the_solve_is_differentiable_exactly():
    g = torch.Generator().manual_seed(1)
    U = torch.randn(6, 4, generator=g, dtype=torch.float64)
    D = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d, l: ridge_solve(U, d, l, "primal"), (D, lam))
    assert torch.autograd.gradcheck(lambda d, l: ridge_solve(U, d, l, "dual"), (D, lam))


def test_mend_sum_and_value_differences():
    g = torch.Generator().manual_seed(2)
    U, Ut, Gt = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    S = mend_sum(Ut, Gt, 0.1)
    assert torch.allclose(S, -0.1 * sum(torch.outer(Ut[j], Gt[j]) for j in range(5)), atol=1e-6)
    D = value_differences(U, Ut, Gt, 0.1)
    # token j's own rank-one shift changes its value by u_jᵀ(−η ũ_j g̃_jᵀ)
    assert torch.allclose(D[2], U[2] @ (-0.1 * torch.outer(Ut[2], Gt[2])), atol=1e-6)


def test_running_norm_is_cumulative_and_ignores_single_rows():
    from factedit.methods.hyper.nets import RunningNorm

    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 6, generator=g) * 3 + 1
    rn = RunningNorm(6)
    with pytest.raises(FactEditError, match="fewer than two rows"):
        rn(x)
    for s in range(0, 50, 7):  # batches of 7 (the last of 1 is ignored)
        rn.update(x[s : s + 7])
    seen = x[:49]
    assert int(rn.count) == 49
    assert torch.allclose(rn.mean.float(), seen.mean(0), atol=1e-5)
    assert torch.allclose(rn.std.float(), seen.std(0), atol=1e-5)
    rn.update(x[:1] * 1e6)  # a one-row batch would poison the variance: ignored
    assert int(rn.count) == 49


def test_editor_net_starts_as_the_identity_and_trains_per_module():
    from factedit.methods.hyper.nets import EditorNet

    torch.manual_seed(0)
    net = EditorNet(d_in=8, d_out=5, n_modules=3, rank=4)
    g = torch.Generator().manual_seed(4)
    u, v = torch.randn(10, 8, generator=g), torch.randn(10, 5, generator=g)
    net.norm.update(torch.cat([u, v], -1))
    ut, gt = net(u, v, 1)
    x = net.norm(torch.cat([u, v], -1))
    assert torch.allclose(torch.cat([ut, gt], -1), x, atol=1e-6)  # B = 0: the identity on normalised inputs
    # a loss through the shift reaches the low-rank blocks, η and the per-module embeddings of that module only
    S = -net.eta[1] * ut.T @ gt
    (S.pow(2).sum() + ridge_solve(u, value_differences(u, ut, gt, net.eta[1]), net.lam(1)).sum()).backward()
    assert net.B[0].grad.abs().sum() > 0 and net.eta.grad[1] != 0 and net.log_lam.grad[1] != 0
    assert net.eta.grad[0] == 0 and float(net.scale.grad[:, 0].abs().sum()) == 0
    with pytest.raises(FactEditError, match="out of range"):
        net(u, v, 3)


# ---- the editors -----------------------------------------------------------------------------------------------
def _cases():
    from factedit import EditRequest, EvalCase

    raw = [("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris", "Where is the Eiffel Tower ? It is in", "Big Ben is in"),
           ("The capital of Italy is", "Italy", "London", "Rome", "Italy has the capital", "The capital of France is"),
           ("Toko Yasuda plays the", "Toko Yasuda", "piano", "guitar", "Toko Yasuda is a musician who plays the",
            "Who plays the"),
           ("Apple was founded by", "Apple", "Bill Gates", "Steve Jobs", "The founder of Apple is", "Microsoft was founded by")]
    return [EvalCase(EditRequest(p, s, n, t, case_id=i), paraphrase_prompts=(para,), neighborhood_prompts=(nb,))
            for i, (p, s, n, t, para, nb) in enumerate(raw)]


HYPER = dict(layers=(2, 3), rank=4, edit_batch=2, lm_batch=2, meta_lr=1e-2, eta_init=1e-2, epochs=1)


@pytest.mark.parametrize("method", ["malmen", "mend"])
def test_meta_training_moves_the_networks_and_the_edit_realises_the_value_differences(method, tmp_path):
    from factedit import get_editor
    from factedit.registry import get_editor_class

    lm = tiny_lm("llama")
    ed = get_editor(method, lm, **HYPER, lam_init=1e-8)
    ed.build(lm)
    init = {k: v.clone() for n in ed.nets.values() for k, v in n.state_dict().items()}
    metrics = ed.fit(lm, _cases())
    assert metrics["meta_steps"] == 2 and metrics["grad_norm"] > 0 and torch.isfinite(torch.tensor(metrics["meta_loss"]))
    after = {k: v for n in ed.nets.values() for k, v in n.state_dict().items()}
    assert any(not torch.equal(init[k], after[k]) for k in init if "norm" not in k)  # meta-training moved θ
    reqs = [c.request for c in _cases()[:3]]
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    flags = [p.requires_grad for p in lm.model.parameters()]
    patch = ed.compute(lm, reqs)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())  # compute is pure
    assert [p.requires_grad for p in lm.model.parameters()] == flags
    cap = ed._capture(lm, reqs)
    for path, (name, i) in ed.slots.items():
        net = ed.nets[name]
        with torch.no_grad():
            ut, gt = net(cap.U[path], cap.G[path], i)
            D = value_differences(cap.U[path], ut, gt, net.eta[i])
        S = patch.deltas[f"{path}.weight"].materialise().T  # (d_in, d_out)
        if method == "malmen":  # fewer rows than inputs, λ → 0: every token's value change is realised
            assert cap.n_rows < cap.U[path].shape[1]
            assert torch.allclose(cap.U[path] @ S, D, rtol=1e-3, atol=1e-4 * float(D.abs().max())), path
        else:  # MEND: the sum of the rank-one shifts (kept factored: float32 products in another order)
            want = mend_sum(ut, gt, net.eta[i]).detach()
            assert torch.allclose(S, want, rtol=1e-5, atol=1e-6 * float(want.abs().max())), path
    ed.save_pretrained(tmp_path / "ed")
    back = get_editor_class(method).from_pretrained(tmp_path / "ed", lm)
    again = back.compute(lm, reqs)
    assert all(torch.equal(again.deltas[k].materialise(), patch.deltas[k].materialise()) for k in patch.deltas)


def test_meta_training_resumes_after_a_kill_to_the_same_networks(tmp_path, monkeypatch):
    from factedit import get_editor
    from factedit.methods import train as trainmod

    def fit(ckpt):
        lm = tiny_lm("llama")
        ed = get_editor("malmen", lm, **{**HYPER, "epochs": 2})
        ed.fit(lm, _cases(), checkpoint=ckpt)
        return {f"{n}.{k}": v for n, net in ed.nets.items() for k, v in net.state_dict().items()}

    want = fit(None)
    real = trainmod.save_checkpoint
    n = {"saves": 0}

    def die(*a, **k):
        real(*a, **k)
        n["saves"] += 1
        if n["saves"] == 3:  # inside the second pass, after its first edit batch
            raise KeyboardInterrupt

    monkeypatch.setattr(trainmod, "save_checkpoint", die)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "ckpt")
    monkeypatch.setattr(trainmod, "save_checkpoint", real)
    got = fit(tmp_path / "ckpt")
    assert want.keys() == got.keys()
    for k in want:  # the normalisers' running statistics included
        assert torch.equal(want[k], got[k]), k


def test_ridge_factors_give_the_same_shift():
    from factedit.methods.hyper.aggregate import ridge_factors

    g = torch.Generator().manual_seed(5)
    U, D = torch.randn(6, 10, generator=g), torch.randn(6, 4, generator=g)
    assert torch.allclose(U.double().T @ ridge_factors(U, D, 0.2), ridge_solve(U, D, 0.2, "primal"), rtol=1e-9, atol=1e-12)


def _state(ed):
    return {f"{n}.{k}": v.clone() for n, net in ed.nets.items() for k, v in net.state_dict().items()}


def test_cached_lower_blocks_train_the_same_networks():
    from factedit import get_editor

    got = {}
    for cache in (True, False):
        lm = tiny_lm("llama")
        ed = get_editor("malmen", lm, **HYPER, cache_prefix=cache, eta_search=False, val_size=0)
        ed.fit(lm, _cases())
        got[cache] = _state(ed)
    for k in got[True]:  # float32 forwards that start at another layer: rounding only
        torch.testing.assert_close(got[True][k], got[False][k], rtol=1e-4, atol=1e-6, msg=k)


def test_eta_search_takes_a_grid_value_and_leaves_the_normalisers_alone():
    from factedit import get_editor

    lm = tiny_lm("llama")
    ed = get_editor("malmen", lm, **{**HYPER, "lam_init": 1e-3}, val_size=0)
    ed.build(lm)
    t = ed._tuples_of(lm, _cases(), "training")
    eta = ed._search_eta(lm, t, [0, 1])
    grid = [10.0**e for e in range(-6, 0)] + [3 * 10.0**e for e in range(-6, -1)]
    assert eta in grid
    assert all(float(n.norm.count) == 0 for n in ed.nets.values())  # training folds the first batch in itself
    assert all(torch.allclose(n.eta, torch.full_like(n.eta, eta)) for n in ed.nets.values())
    # the chosen η has the lowest meta loss of the grid, and the grid matters (the losses differ)
    ed._normalise_on(lm, t, [0, 1])

    @torch.no_grad()
    def loss_at(e):
        for n in ed.nets.values():
            n.eta.fill_(e)
        g, kl, _ = ed._losses(lm, t, [0, 1], update_norm=False)
        return float(g + kl)

    losses = [loss_at(e) for e in grid]
    assert loss_at(eta) <= min(losses) + 1e-6 and max(losses) > min(losses) + 0.1


def test_validation_keeps_the_best_state_and_resumes(tmp_path, monkeypatch):
    from factedit import get_editor
    from factedit.methods import train as trainmod

    def fit(ckpt):
        lm = tiny_lm("llama")
        ed = get_editor("malmen", lm, **{**HYPER, "meta_lr": 0.3, "epochs": 3}, val_every=1)
        m = ed.fit(lm, _cases(), checkpoint=ckpt, val_cases=_cases()[::-1])
        return lm, ed, m

    lm, ed, m = fit(None)
    hist = [v["loss"] for v in m["validation"]]
    assert len(hist) == 6 and m["val_cases"] == 4
    assert m["val_best_loss"] == min(hist) and hist[-1] > min(hist)  # the last state is not the best here
    assert {"edit_acc", "gen_acc", "loc_agree"} <= m["validation"][0].keys()
    # the kept state is the best validated one: validating it again gives the best score
    v = ed._validate(lm, ed._tuples_of(lm, _cases()[::-1], "validation"))
    assert v["loss"] == pytest.approx(min(hist), rel=1e-5)
    want = _state(ed)
    real = trainmod.save_checkpoint
    n = {"saves": 0}

    def die(*a, **k):
        real(*a, **k)
        n["saves"] += 1
        if n["saves"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainmod, "save_checkpoint", die)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "ckpt")
    monkeypatch.setattr(trainmod, "save_checkpoint", real)
    got = _state(fit(tmp_path / "ckpt")[1])
    for k in want:  # the best state and its score travel with the checkpoint
        assert torch.equal(want[k], got[k]), k


def test_zero_epochs_is_the_untrained_counterpart():
    from factedit import get_editor

    lm = tiny_lm("llama")
    ed = get_editor("malmen", lm, **{**HYPER, "epochs": 0}, val_every=1)
    m = ed.fit(lm, _cases(), val_cases=_cases())
    assert m["meta_steps"] == 0 and len(m["validation"]) == 1
    rows = ed._capture(lm, [c.request for c in _cases()]).n_rows
    for net in ed.nets.values():
        assert all(float(b.detach().abs().sum()) == 0 for b in net.B)  # the identity networks
        assert float(net.norm.count) == rows * net.n_modules  # every module's training capture, once
    assert ed.compute(lm, [_cases()[0].request]).deltas  # and it edits


@pytest.mark.parametrize("method", ["malmen", "mend"])
def test_eta_scale_scales_the_shift_at_edit_time_and_is_refused_in_training(method, tmp_path):
    from factedit import get_editor
    from factedit.registry import get_editor_class

    lm = tiny_lm("llama")
    ed = get_editor(method, lm, **{**HYPER, "epochs": 0})
    ed.fit(lm, _cases())
    ed.save_pretrained(tmp_path / "ed")
    reqs = [c.request for c in _cases()[:2]]
    one = ed.compute(lm, reqs)
    three = get_editor_class(method).from_pretrained(tmp_path / "ed", lm, {"eta_scale": 3.0}).compute(lm, reqs)
    for k, d in one.deltas.items():  # the shift is linear in η (MEND's sum, and MALMEN's D in its ridge solve)
        a, b = d.materialise(), three.deltas[k].materialise()
        assert torch.allclose(b, 3 * a, rtol=1e-4, atol=1e-6 * float(a.abs().max())), k
    with pytest.raises(FactEditError, match="eta_scale is an edit-time setting"):
        get_editor(method, lm, **{**HYPER, "eta_scale": 2.0}).fit(lm, _cases())
