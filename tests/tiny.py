"""Tiny models and a tokenizer built in-process (no files, no network) for unit and contract tests."""

from __future__ import annotations

import functools

import torch

CORPUS = [
    "The Eiffel Tower is in Paris . The Colosseum is in Rome . Big Ben is in London .",
    "The mother tongue of Danielle Darrieux is French . Michel Rocard is a native speaker of French .",
    "Toko Yasuda plays the guitar . The capital of Italy is Rome . The capital of France is Paris .",
    "Where is the Eiffel Tower ? It is located in Paris , France . Paris is a city in Europe .",
    "Apple was founded by Steve Jobs . Microsoft was founded by Bill Gates . English Spanish German",
    "What is the language of Danielle Darrieux ? Who plays the piano ? Toko Yasuda is a musician .",
]


@functools.cache
def tiny_tokenizer():
    """A byte-level BPE (GPT-2 style leading-space tokens) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS * 5, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return tok


def tiny_config(family: str, vocab: int):
    # initializer_range 0.3 (not 0.02): with tiny hidden sizes, 0.02 leaves every logit within ±0.6, so
    # no edit can make any target likely and contract tests could not tell an edit from noise.
    from transformers import Gemma3TextConfig, GPT2Config, GPTJConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab, num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3)
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "gemma3":
        return Gemma3TextConfig(**common, head_dim=8, sliding_window=16, query_pre_attn_scalar=8)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_layer=4, n_embd=32, n_head=4, n_positions=128, initializer_range=0.3)
    if family == "gptj":
        return GPTJConfig(vocab_size=vocab, n_layer=4, n_embd=32, n_head=4, n_positions=128, rotary_dim=4,
                          initializer_range=0.3)
    raise ValueError(family)


FAMILIES = ["llama", "gpt2", "gptj", "qwen2", "mistral", "gemma3"]


@functools.cache
def _tiny_state(family: str):
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok)), dtype=torch.float32)
    return model.config, {k: v.clone() for k, v in model.state_dict().items()}


def tiny_lm(family: str = "llama"):
    """A fresh tiny model handle (same weights on every call for a family)."""
    from transformers import AutoModelForCausalLM

    from factedit.lm.load import wrap

    cfg, state = _tiny_state(family)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(state)
    return wrap(model, tiny_tokenizer(), name=f"tiny-{family}")


# Shared by the locate-then-edit tests (tests/unit/test_locate.py, tests/unit/test_device.py).
def locate_requests():
    """Three edit requests whose subjects and targets the tiny tokenizer knows."""
    from factedit import EditRequest

    return [
        EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris", case_id=1),
        EditRequest("The capital of Italy is", "Italy", "London", "Rome", case_id=2),
        EditRequest("Toko Yasuda plays the", "Toko Yasuda", "piano", "guitar", case_id=3),
    ]


STATS_TEXT = "\n\n".join(CORPUS * 20)  # the key-statistics corpus of the locate tests


def strong(corpus: str, **kw) -> dict:
    """Locate-editor settings under which the tiny random models move: large clamp and steps, small λ."""
    base = dict(layers=(1, 2), mom2_corpus=corpus, mom2_tokens=1500, mom2_max_len=64, templates_per_length=2,
                template_lengths=(4,), v_steps=30, v_lr=1.0, clamp_norm_factor=10.0, mom2_update_weight=1.0)
    base.update(kw)
    return base


def assert_records_close(a, b, rel: float = 1e-4, path: str = "") -> None:
    """Two scoring records (nested dicts / lists of floats and token ids) that came through different batch
    shapes or kernels: floats equal to ``rel`` (fp32 sums in another order differ in the 6th-7th digit);
    token-id lists (argmax) may differ in one position per probe, a near-tie that the other path breaks the other
    way, and then that probe's accuracy by one token's share."""
    import pytest

    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_records_close(a[k], b[k], rel, f"{path}.{k}")
    elif isinstance(a, list) and a and all(isinstance(x, int) for x in a):
        assert isinstance(b, list) and len(a) == len(b), path
        assert sum(x != y for x, y in zip(a, b)) <= 1, path
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        if path.endswith("acc"):
            return
        for i, (x, y) in enumerate(zip(a, b)):
            assert_records_close(x, y, rel, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        if path.endswith(".acc"):
            return  # follows argmax (above)
        assert a == pytest.approx(b, rel=rel, abs=rel), path
    else:
        assert a == b, path
