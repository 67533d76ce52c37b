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
