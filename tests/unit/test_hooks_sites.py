"""Hooks written once, sites as data, stacking patches, interventions on decode steps, and the model lock."""

import threading
import time

import pytest
import torch
from tiny import FAMILIES, tiny_lm

from factedit import FactEditError
from factedit.eval.scoring import score_targets
from factedit.lm.arch import SITE_KINDS, Site, resolve_site
from factedit.lm.generate import sample_batch
from factedit.lm.hooks import ForwardContext, StopForward, Trace, TraceDict, current_context, forward_context
from factedit.methods.reft import LoReFTIntervention
from factedit.patch.modules import ModulePatch, Placement, register_intervention
from factedit.patch.weights import Delta, WeightPatch


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _ids(lm, text="The capital of Italy is"):
    return torch.tensor([lm.tokenizer(text)["input_ids"]])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_resolves_for_every_family(family):
    lm = tiny_lm(family)
    seen = {}
    for kind in SITE_KINDS:
        module, where, width = resolve_site(lm.model, lm.arch, Site(kind, 2))
        with Trace(module, retain_input=where == "input", retain_output=where == "output") as t:
            lm.model(input_ids=_ids(lm))
        h = t.input if where == "input" else t.output
        assert h.shape[-1] == width, kind
        seen[kind] = h
    assert seen["mlp_out_input"].shape[-1] == (128 if family in ("gpt2", "gptj") else 64) and seen["block_output"].shape[-1] == lm.hidden_size
    assert not torch.equal(seen["block_input"], seen["block_output"])
    with pytest.raises(FactEditError, match="out of range"):
        resolve_site(lm.model, lm.arch, Site("mlp_input", 4))
    with pytest.raises(FactEditError, match="unknown site"):
        Site("mlp_middle", 1)


def test_traces_remove_themselves_even_when_the_forward_raises():
    lm = tiny_lm("llama")
    n0 = _n_hooks(lm.model)
    blk = lm.model.get_submodule(lm.arch.block_path(1))

    def boom(out, _args):
        raise RuntimeError("inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"), Trace(blk, edit_output=boom):
        lm.model(input_ids=_ids(lm))
    assert _n_hooks(lm.model) == n0
    # stopping early: the forward ends after the named block (the StopForward is swallowed), hooks gone
    paths = [lm.arch.mlp_out_path(0), lm.arch.mlp_out_path(1)]
    with TraceDict(lm.model, paths, retain_input=True, retain_grad=False, stop_after=lm.arch.block_path(1)) as td:
        lm.model(input_ids=_ids(lm))
    assert td[paths[1]].input.shape[-1] == 64 and _n_hooks(lm.model) == n0
    with pytest.raises(StopForward), Trace(blk, stop=False, edit_output=lambda o, a: (_ for _ in ()).throw(StopForward())):
        lm.model(input_ids=_ids(lm))  # a StopForward the trace did not ask for is not swallowed
    assert _n_hooks(lm.model) == n0


def test_retained_output_carries_its_gradient():
    lm = tiny_lm("llama")
    mlp_out = lm.model.get_submodule(lm.arch.mlp_out_path(1))
    with Trace(mlp_out, retain_input=True, retain_grad=True) as t:
        lm.model(input_ids=_ids(lm)).logits[0, -1, 5].backward()
    assert t.output.grad is not None and t.output.grad.shape == t.output.shape and t.output.grad.abs().sum() > 0


def test_forward_context_is_per_thread():
    seen = {}
    with forward_context(torch.tensor([3]), query=["q"]) as ctx:
        assert current_context() is ctx and ctx.rows["query"] == ["q"]
        th = threading.Thread(target=lambda: seen.setdefault("other", current_context()))
        th.start()
        th.join()
    assert seen["other"] is None and current_context() is None


def _loreft(lm, seed):
    mod = LoReFTIntervention(lm.hidden_size, 2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return mod


def _wpatch(lm, name, seed, scale=1e-2):
    p = dict(lm.model.named_parameters())[name]
    g = torch.Generator().manual_seed(seed)
    return WeightPatch(method="t", config={}, base_fingerprint=lm.fingerprint,
                       deltas={name: Delta(dense=torch.randn(p.shape, generator=g) * scale)})


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2), (2, 0, 3, 1)])
def test_stacked_patches_revert_in_any_order_bit_exactly(order):
    lm = tiny_lm("llama")
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    w1, w2 = lm.arch.mlp_out_path(1) + ".weight", lm.arch.mlp_out_path(2) + ".weight"
    patches = [_wpatch(lm, w1, 0), _wpatch(lm, w1, 1), _wpatch(lm, w2, 2),  # two on the same weight
               ModulePatch(method="t", config={}, base_fingerprint=lm.fingerprint,
                           placements=[Placement(Site("mlp_input", 2), "all")], modules=[_loreft(lm, 3)])]
    ids = _ids(lm)
    base = lm.model(input_ids=ids).logits
    handles = [p.apply(lm) for p in patches]
    live = set(range(4))
    for i in order:
        handles[i].revert()
        live.discard(i)
        # what is left equals applying only the live patches, in their order, on a fresh model
        ref = tiny_lm("llama")
        with torch.no_grad():
            for j in sorted(live):
                if j < 3:
                    patches[j].apply(ref)
        got = {k: v for k, v in lm.model.state_dict().items()}
        assert all(torch.equal(got[k], v) for k, v in ref.model.state_dict().items())
    assert all(torch.equal(state[k], v) for k, v in lm.model.state_dict().items())
    assert torch.equal(lm.model(input_ids=ids).logits, base) and not lm.hooks


def test_a_merged_patch_stays_when_others_are_reverted():
    lm = tiny_lm("llama")
    w = lm.arch.mlp_out_path(1) + ".weight"
    a, b = _wpatch(lm, w, 0), _wpatch(lm, w, 1)
    ha, hb = a.apply(lm), b.apply(lm)
    ha.merge()
    hb.revert()
    ref = tiny_lm("llama")
    a.apply(ref)
    assert torch.equal(dict(lm.model.named_parameters())[w], dict(ref.model.named_parameters())[w])
    assert not lm.weight_stack.base  # nothing left to revert: no copy kept


@register_intervention("test-decode-shift")
class DecodeShift(torch.nn.Module):
    """Adds a fixed vector at every position, decoding steps included; records per-query preparation."""

    acts_on_decode = True

    def __init__(self, d: int) -> None:
        super().__init__()
        self.v = torch.nn.Parameter(torch.zeros(d))
        self.prepared: list = []

    def prepare(self, ctx: ForwardContext | None, lm):
        self.prepared.append(None if ctx is None else ctx.prompt_lens.tolist())
        return len(self.prepared)

    def forward(self, h, state=None):
        return h + self.v


def test_an_intervention_on_decode_steps_changes_greedy_generation():
    lm = tiny_lm("llama")
    prompts = ["The capital of Italy is", "Big Ben is in"]
    base = sample_batch(lm, prompts, max_length=14, greedy=True)
    mod = DecodeShift(lm.hidden_size)
    out = lm.model.get_output_embeddings().weight  # push towards one token at every step it acts on
    with torch.no_grad():
        mod.v.copy_(out[42] * 3)

    def gen(positions, module):
        patch = ModulePatch(method="t", config={}, base_fingerprint=lm.fingerprint,
                            placements=[Placement(Site("block_output", 3), positions)], modules=[module])
        with patch.apply(lm):
            return sample_batch(lm, prompts, max_length=14, greedy=True)

    on_decode = gen("last", mod)
    assert on_decode != base
    assert mod.prepared == [[len(lm.tokenizer(p)["input_ids"]) for p in prompts]]  # once per query batch
    # the same module with decoding switched off acts on the prompt's last token only: the first new token is
    # the same (the same prompt forward), the continuation is another
    quiet = DecodeShift(lm.hidden_size)
    quiet.acts_on_decode = False
    quiet.load_state_dict(mod.state_dict())
    prompt_only = gen("last", quiet)
    assert prompt_only != on_decode
    one = lambda texts: [lm.tokenizer(t)["input_ids"][:1] for t in texts]  # noqa: E731
    with ModulePatch(method="t", config={}, base_fingerprint=lm.fingerprint,
                     placements=[Placement(Site("block_output", 3), "last")], modules=[mod]).apply(lm):
        first_on = sample_batch(lm, prompts, max_length=len(lm.tokenizer(prompts[0])["input_ids"]) + 1, greedy=True)
    assert one(first_on)[0] == one(prompt_only)[0]


def test_scoring_waits_for_a_compute_in_another_thread_and_sees_the_unedited_model():
    from factedit import EditRequest, get_editor

    lm = tiny_lm("llama")
    prompts, targets = ["The capital of Italy is"], [" Paris"]
    want = score_targets(lm, prompts, targets)[0].nll
    ed = get_editor("ft", lm, layer=1, lr=0.05, norm_constraint=1.0, steps=30)
    started = threading.Event()
    real = ed._compute

    def slow(lm_, reqs):
        started.set()
        # while this runs, swap a weight in place as compute-internal work would (undone before returning)
        w = dict(lm_.model.named_parameters())[lm_.arch.mlp_out_path(1) + ".weight"]
        keep = w.detach().clone()
        with torch.no_grad():
            w.mul_(3.0)
        time.sleep(0.5)
        with torch.no_grad():
            w.copy_(keep)
        return real(lm_, reqs)

    ed._compute = slow
    th = threading.Thread(target=ed.compute, args=(lm, [EditRequest("The capital of Italy is", "Italy", "London")]))
    th.start()
    started.wait()
    got = score_targets(lm, prompts, targets)[0].nll  # blocks until the compute is done
    th.join()
    assert got == want  # the same model and the same batch: bit-exact


def test_reset_hooks_removes_what_module_patches_installed():
    lm = tiny_lm("llama")
    n0 = _n_hooks(lm.model)
    p = ModulePatch(method="t", config={}, base_fingerprint=lm.fingerprint,
                    placements=[Placement(Site("mlp_input", 1), "all"), Placement(Site("block_output", 2), "last")],
                    modules=[_loreft(lm, 0), _loreft(lm, 1)])
    h = p.apply(lm)
    h.merge()  # kept for the life of the model object ...
    assert _n_hooks(lm.model) == n0 + 2 and len(lm.hooks) == 2
    lm.reset_hooks()  # ... unless reset
    assert _n_hooks(lm.model) == n0 and not lm.hooks
