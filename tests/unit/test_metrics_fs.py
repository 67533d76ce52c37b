import math

import pytest
from tiny import tiny_lm

from factedit.eval.metrics import aggregate, case_metrics
from factedit.eval.scoring import ngram_entropy
from factedit.fsutil import JsonlWriter, read_jsonl


def _x(p, acc=1.0, argmax=(1,)):
    return {"nll": -math.log(p), "acc": acc, "argmax": list(argmax)}


def test_counterfact_case_metrics():
    rec = {"rewrite": [_x(0.6)], "rewrite_true": [_x(0.2)],
           "paraphrase": [_x(0.3, 0.0), _x(0.1, 0.0)], "paraphrase_true": [_x(0.2), _x(0.2)],
           "neighborhood": [_x(0.5)], "neighborhood_true": [_x(0.1)]}
    m = case_metrics(rec, "counterfact")
    assert m["efficacy"] == 1.0 and m["generalization"] == 0.5 and m["specificity"] == 0.0
    assert m["efficacy_magnitude"] == pytest.approx(0.4)
    assert m["generalization_magnitude"] == pytest.approx((0.1 - 0.1) / 2)
    assert m["specificity_magnitude"] == pytest.approx(-0.4)
    assert m["generalization_acc"] == 0.0


def test_zsre_case_metrics_and_agreement():
    pre = {"raw": {"locality": [_x(0.5, 0.5, argmax=(4, 5))]}}
    rec = {"rewrite": [_x(0.9, 1.0)], "paraphrase": [_x(0.5, 0.5)], "locality": [_x(0.4, 0.5, argmax=(4, 6))]}
    m = case_metrics(rec, "zsre", pre=pre)
    assert m == {"efficacy": 1.0, "generalization": 0.5, "specificity": 0.5, "locality": 0.5}


def test_aggregate_percent_and_harmonic_score():
    agg = aggregate([{"efficacy": 1.0, "generalization": 0.5, "specificity": 1.0},
                     {"efficacy": 1.0, "generalization": 0.5, "specificity": 0.0}])
    assert agg["efficacy"] == 100 and agg["generalization"] == 50 and agg["specificity"] == 50
    assert agg["score"] == pytest.approx(3 / (1 / 100 + 1 / 50 + 1 / 50), abs=0.01)


def test_ngram_entropy_prefers_varied_text():
    assert ngram_entropy("the the the the the the the the") == 0.0
    varied = ngram_entropy("The tower was built in Paris by Gustave Eiffel for the fair of 1889 .")
    assert varied > 3.0


def test_jsonl_survives_a_torn_last_line(tmp_path):
    f = tmp_path / "c.jsonl"
    with JsonlWriter(f) as w:
        w.write({"index": 0})
        w.write({"index": 1})
    with open(f, "a") as g:
        g.write('{"index": 2, "po')
    assert [r["index"] for r in read_jsonl(f)] == [0, 1]
    with JsonlWriter(f) as w:
        w.write({"index": 2})
    assert [r["index"] for r in read_jsonl(f)] == [0, 1, 2]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_batched_sampling_matches_one_prompt_at_a_time(family):
    from factedit.lm.generate import sample, sample_batch

    lm = tiny_lm(family)
    prompts = ["The Eiffel Tower is in", "Paris", "Big Ben is located in the city of"]
    for greedy in (True, False):
        one = [sample(lm, p, max_length=14, top_k=5, seed=10 + k, greedy=greedy) for k, p in enumerate(prompts)]
        many = sample_batch(lm, prompts, max_length=14, top_k=5, seeds=[10 + k for k in range(3)], greedy=greedy,
                            batch_size=2)
        assert many == one
    assert sample_batch(lm, ["a b c d e f g h i j k l m n o p"], max_length=3) == [""]


def _manual_ppl(lm, windows):
    import torch

    nll, n = 0.0, 0
    for w, scored_from in windows:
        x = torch.tensor([w])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=x).logits[0].float(), -1)
        for i in range(scored_from, len(w)):
            nll -= float(logp[i - 1, w[i]])
            n += 1
    return math.exp(nll / n)


def test_perplexity_windows_start_like_a_text():
    from tiny import CORPUS, tiny_tokenizer
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from factedit.eval.scoring import perplexity

    lm = tiny_lm("llama")
    text = " ".join(CORPUS)
    ids = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])[:20]
    # no BOS (SmolLM2-like): plain windows of 8, the first token of each is context only
    want = _manual_ppl(lm, [(ids[s : s + 8], 1) for s in range(0, 19, 8)])
    assert perplexity(lm, text, max_tokens=20, window=8) == pytest.approx(want, rel=1e-5)
    # a tokenizer that starts every text with BOS (Gemma-like): every window starts with it, all of the
    # text's tokens are scored
    base = tiny_tokenizer()
    tk = base.backend_tokenizer.__class__.from_str(base.backend_tokenizer.to_str())
    bos = base.convert_tokens_to_ids("<|endoftext|>")
    tk.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    lm.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                           pad_token="<|endoftext|>")
    assert lm.tokenizer("Paris")["input_ids"][0] == bos
    want = _manual_ppl(lm, [([bos] + ids[s : s + 7], 1) for s in range(0, 20, 7)])
    assert perplexity(lm, text, max_tokens=20, window=8) == pytest.approx(want, rel=1e-5)


def test_perplexity_builds_no_autograd_graph(monkeypatch):
    from tiny import CORPUS

    from factedit.eval.scoring import perplexity

    lm = tiny_lm("llama")
    seen = []
    h = lm.model.register_forward_hook(lambda _m, _a, out: seen.append(out.logits.requires_grad))
    perplexity(lm, " ".join(CORPUS), max_tokens=20, window=8)
    h.remove()
    assert seen and not any(seen)


PACK_PROMPTS = ["The Eiffel Tower is in", "The Eiffel Tower is in", "Big Ben is located in the city of",
                "Paris", "The Eiffel Tower is in", "Big Ben is located in the city of", "Toko Yasuda plays the"]
PACK_TARGETS = ["Paris", "Rome , Italy", "London", "is a city in Europe", "the capital of France", "Rome",
                "guitar"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "qwen2", "mistral", "gemma3"])
def test_packed_scoring_equals_one_row_per_target(family):
    """All targets of a prompt in one row (block mask) score as separate rows do, across families."""
    from factedit.eval.scoring import packable, score_targets

    lm = tiny_lm(family)
    assert packable(lm)
    for bs in (1, 2, 32):
        sep = score_targets(lm, PACK_PROMPTS, PACK_TARGETS, batch_size=bs, pack=False)
        pk = score_targets(lm, PACK_PROMPTS, PACK_TARGETS, batch_size=bs, pack=True)
        for a, b in zip(sep, pk):
            assert b.argmax == a.argmax and b.token_acc == a.token_acc
            assert b.nll == pytest.approx(a.nll, rel=1e-5, abs=1e-5)


def test_packed_scoring_runs_each_prompt_once_and_only_on_plain_models():
    from factedit.eval.scoring import packable, score_targets

    lm = tiny_lm("llama")
    seen = []
    h = lm.model.model.layers[0].register_forward_hook(lambda _m, _a, out: seen.append(out[0].shape[0]
                                                       if isinstance(out, tuple) else out.shape[0]))
    try:
        assert not packable(lm)  # a hooked module may read the whole row: separate rows
        score_targets(lm, PACK_PROMPTS, PACK_TARGETS, batch_size=32)
        assert seen == [len(PACK_PROMPTS)]
    finally:
        h.remove()
    assert packable(lm)
    calls = []
    real = lm.model.forward

    def spy(*a, **k):
        calls.append(k["input_ids"].shape[0])
        return real(*a, **k)

    lm.model.forward = spy
    try:
        score_targets(lm, PACK_PROMPTS, PACK_TARGETS, batch_size=32)
    finally:
        del lm.model.forward
    assert calls == [len(set(PACK_PROMPTS))]  # one row per distinct prompt
    cfg = lm.model.config
    old = cfg._attn_implementation
    cfg._attn_implementation_internal = "flash_attention_2"  # takes padding masks only, not a block mask
    try:
        assert not packable(lm)
    finally:
        cfg._attn_implementation_internal = old
    assert packable(lm)


def test_packed_scoring_falls_back_beyond_a_sliding_window(monkeypatch):
    """Gemma 3's sliding-window layers need their own mask: a packed row longer than the window is
    scored as separate rows (tiny Gemma 3: window 16)."""
    from factedit.eval import scoring
    from factedit.eval.scoring import score_targets

    lm = tiny_lm("gemma3")
    long = "The Eiffel Tower is in Paris . The Colosseum is in Rome . Big Ben is in London . The capital of"
    prompts, targets = [long, long], ["Italy is Rome", "France"]
    sep = score_targets(lm, prompts, targets, pack=False)
    pk = score_targets(lm, prompts, targets, pack=True)
    for a, b in zip(sep, pk):
        assert b.argmax == a.argmax and b.nll == pytest.approx(a.nll, rel=1e-5, abs=1e-5)
    # the fallback matters: one block mask for all layers would let the sliding layers see too far
    monkeypatch.setattr(scoring, "_window_limit", lambda _lm: None)
    wrong = score_targets(lm, prompts, targets, pack=True)
    assert max(abs(a.nll - b.nll) for a, b in zip(sep, wrong)) > 1e-4
