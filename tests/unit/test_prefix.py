"""Running from a layer on with cached lower blocks equals the full forward."""

import pytest
import torch
from tiny import tiny_lm

from factedit.errors import FactEditError
from factedit.lm.batch import batch_logits, make_batch
from factedit.lm.hooks import Trace
from factedit.lm.prefix import block_inputs, pad_hidden, start_at

PROMPTS = ["The capital of France is", "Water boils at", "A cat"]
TARGETS = [" Paris", " one hundred degrees", " meows loudly"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_start_at_equals_the_full_forward(family):
    lm = tiny_lm(family)
    b = make_batch(lm, PROMPTS, TARGETS)
    with torch.no_grad():
        full, labels = batch_logits(lm, b)
    layer = lm.n_layers - 1
    rows = block_inputs(lm, b, layer)
    assert [r.shape[0] for r in rows] == b.attention_mask.sum(1).tolist()
    ran = []
    with Trace(lm.model.get_submodule(lm.arch.block_path(0)), retain_output=False,
               edit_output=lambda out, a: ran.append(1) or out):
        with torch.no_grad(), start_at(lm, layer, pad_hidden(rows, b)):
            part, labels2 = batch_logits(lm, b)
    real = b.attention_mask[:, -b.keep :].bool()  # padded positions carry other (unread) values
    torch.testing.assert_close(part[real], full[real], rtol=1e-5, atol=1e-5)  # float32: summation order at most
    assert torch.equal(labels, labels2)
    # the skipped blocks are restored afterwards: a full forward runs block 0 again
    with torch.no_grad():
        again, _ = batch_logits(lm, b)
    assert torch.equal(again, full)


def test_start_at_gives_the_same_keys_at_an_edited_module():
    lm = tiny_lm("llama")
    b = make_batch(lm, PROMPTS, TARGETS)
    layer = lm.n_layers - 1
    path = lm.arch.mlp_out_path(layer)
    with Trace(lm.model.get_submodule(path), retain_input=True, retain_output=False) as tr, torch.no_grad():
        batch_logits(lm, b)
    full_in = tr.input
    with Trace(lm.model.get_submodule(path), retain_input=True, retain_output=False) as tr, torch.no_grad(), \
            start_at(lm, layer, pad_hidden(block_inputs(lm, b, layer), b)):
        batch_logits(lm, b)
    real = b.attention_mask.bool()
    torch.testing.assert_close(tr.input[real], full_in[real], rtol=1e-5, atol=1e-5)


def test_stale_cache_is_refused():
    lm = tiny_lm("llama")
    b = make_batch(lm, PROMPTS, TARGETS)
    rows = block_inputs(lm, b, 1)
    other = make_batch(lm, PROMPTS, [" x", " y", " z"])
    with pytest.raises(FactEditError, match="stale"):
        pad_hidden(rows, other)
