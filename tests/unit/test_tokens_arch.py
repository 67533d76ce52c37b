import pytest
import torch
from tiny import FAMILIES, tiny_lm, tiny_tokenizer

from factedit import FactEditError
from factedit.lm import arch as archmod
from factedit.lm.batch import make_batch
from factedit.lm.tokens import encode, encode_target, subject_last_index


def test_target_tokens_follow_the_prompt_with_leading_space():
    tok = tiny_tokenizer()
    p_ids, t_ids = encode_target(tok, "The Eiffel Tower is in", "Paris")
    assert p_ids == encode(tok, "The Eiffel Tower is in")
    assert tok.decode(t_ids) == " Paris"


def test_subject_last_index_from_offsets():
    tok = tiny_tokenizer()
    prompt = "The mother tongue of Danielle Darrieux is"
    i = subject_last_index(tok, prompt, "Danielle Darrieux")
    ids = encode(tok, prompt)
    assert tok.decode(ids[: i + 1]).endswith("Darrieux")
    assert not tok.decode(ids[:i]).endswith("Darrieux")
    with pytest.raises(FactEditError, match="does not occur"):
        subject_last_index(tok, prompt, "Paris")


def test_batch_labels_mark_exactly_the_target_tokens():
    lm = tiny_lm("llama")
    b = make_batch(lm, ["The capital of Italy is", "Big Ben is in"], ["Rome", "London city"])
    for row, target in enumerate(["Rome", "London city"]):
        labels = b.labels[row][b.labels[row] >= 0].tolist()
        assert lm.tokenizer.decode(labels) == " " + target
    assert int(b.prompt_lens[1]) == len(encode(lm.tokenizer, "Big Ben is in"))


@pytest.mark.parametrize("family", FAMILIES)
def test_arch_record_resolves_every_module(family):
    lm = tiny_lm(family)
    rec = lm.arch
    assert lm.n_layers == 4
    for layer in range(lm.n_layers):
        out = lm.model.get_submodule(rec.mlp_out_path(layer))
        inp = lm.model.get_submodule(rec.mlp_in_path(layer))
        w = archmod.weight_as_out_in(out, rec)
        # The out-projection maps the MLP width back to the hidden size, whatever the storage layout.
        assert w.shape[0] == lm.hidden_size
        assert archmod.weight_as_out_in(inp, rec).shape[1] == lm.hidden_size
        lm.model.get_submodule(f"{rec.blocks}.{layer}.{rec.attn_out}")
    lm.model.get_submodule(rec.final_norm)
    assert lm.model.get_submodule(rec.embed) is lm.model.get_input_embeddings()
    assert (rec.layout == "conv1d") == (family == "gpt2")


def test_linear_delta_out_matches_weight_change_for_both_layouts():
    x = torch.randn(3, 5)
    d = torch.randn(7, 5)  # (out, in)
    assert torch.allclose(archmod.linear_delta_out(x, d, "linear"), x @ d.T)
    assert torch.allclose(archmod.linear_delta_out(x, d.T.contiguous(), "conv1d"), x @ d.T)


def test_structural_fallback_and_unknown_arch():
    lm = tiny_lm("llama")
    lm.model.config.model_type = "my-llama-fork"
    assert archmod.arch_for(lm.model).family.endswith("-like")
    with pytest.raises(FactEditError, match="unsupported architecture"):
        archmod.arch_for(torch.nn.Linear(2, 2))


def test_layer_range_check_names_the_model():
    lm = tiny_lm("gpt2")
    with pytest.raises(FactEditError, match="layer index 9 is out of range: tiny-gpt2 has layers 0..3"):
        lm.check_layers([1, 9])
