import json

import pytest
import torch
from tiny import tiny_lm

from factedit import FactEditError, cli
from factedit.eval.trace import Fact, embedding_std, trace, trace_fact

FACTS = [Fact("The Eiffel Tower is in", "Eiffel Tower"), Fact("Big Ben is located in", "Big Ben", "London")]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_restoring_the_last_block_at_the_last_token_restores_the_clean_output(family):
    lm = tiny_lm(family)
    noise = 3 * embedding_std(lm, FACTS)
    r = trace_fact(lm, FACTS[0], noise, samples=3, window=2)
    n = lm.n_layers
    assert len(r["hidden"]["subject_last"]) == n and len(r["mlp"]["last"]) == n
    # the final block's output at the last position decides the next-token distribution
    assert r["p_corrupt"] + r["hidden"]["last"][-1] == pytest.approx(r["p_clean"], abs=1e-5)
    # no noise: nothing to restore
    r0 = trace_fact(lm, FACTS[0], 0.0, samples=2, window=2)
    assert r0["p_corrupt"] == pytest.approx(r0["p_clean"], abs=1e-5)
    assert max(abs(v) for k in ("hidden", "mlp", "attn") for p in ("subject_last", "last") for v in r0[k][p]) < 1e-5


def test_batched_restoration_equals_a_single_restored_run():
    lm = tiny_lm("llama")
    f = FACTS[0]
    noise = 2.0
    r = trace_fact(lm, f, noise, kinds=["hidden"], samples=2, seed=3, max_rows=4)  # several chunks
    # one restoration by hand: block 1's output at the subject's last token
    from factedit.eval.trace import _subject_span
    from factedit.lm.tokens import encode

    ids = torch.tensor([encode(lm.tokenizer, f.prompt)])
    s0, s1 = _subject_span(lm, f.prompt, f.subject)
    blk = lm.model.get_submodule(lm.arch.block_path(1))
    clean = {}
    h = blk.register_forward_hook(lambda m, a, o: clean.__setitem__("h", (o[0] if isinstance(o, tuple) else o).clone()))
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0, -1]
    h.remove()
    answer = int(logits.argmax())
    eps = torch.randn(2, s1 - s0 + 1, lm.hidden_size, generator=torch.Generator().manual_seed(3)) * noise

    def noisy(m, a, o):
        o = o.clone()
        o[:, s0 : s1 + 1] += eps
        return o

    def put(m, a, o):
        x = (o[0] if isinstance(o, tuple) else o).clone()
        x[:, s1] = clean["h"][0, s1]
        return (x,) + tuple(o[1:]) if isinstance(o, tuple) else x

    hs = [lm.model.get_input_embeddings().register_forward_hook(noisy), blk.register_forward_hook(put)]
    with torch.no_grad():
        p = torch.softmax(lm.model(input_ids=ids.expand(2, -1)).logits[:, -1], -1)[:, answer].mean()
    for x in hs:
        x.remove()
    assert r["p_corrupt"] + r["hidden"]["subject_last"][1] == pytest.approx(float(p), abs=1e-5)


def test_trace_summary_and_bad_input():
    lm = tiny_lm("llama")
    res = trace(lm, FACTS, samples=2, window=2, progress=False)
    assert res["n_facts"] == 2 and 0 <= res["peak_layer"] < lm.n_layers
    assert len(res["mean"]["mlp"]["subject_last"]) == lm.n_layers
    from factedit.lm.tokens import encode_target

    first = encode_target(lm.tokenizer, FACTS[1].prompt, "London")[1][0]  # a given answer: its first token
    assert res["facts"][1]["answer"] == lm.tokenizer.decode([first])
    with pytest.raises(FactEditError, match="does not occur"):
        trace(lm, [Fact("The Eiffel Tower is in", "Big Ben")], samples=1, progress=False)
    with pytest.raises(FactEditError, match="kind"):
        trace(lm, FACTS, kinds=["mlp", "residual"], samples=1, progress=False)
    with pytest.raises(FactEditError, match="no facts"):
        trace(lm, [], progress=False)


def test_trace_command(tmp_path, capsys):
    lm = tiny_lm("llama")
    folder = tmp_path / "tiny"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([{"case_id": 5, "prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower",
                                 "target_new": "Rome", "ground_truth": "Paris", "rephrase_prompt": "Eiffel Tower is in",
                                 "locality_prompt": "Big Ben is in", "locality_ground_truth": "London"}]))
    out = tmp_path / "t.json"
    argv = ["trace", "--model", str(folder), "--data", str(data), "--samples", "2", "--window", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "peak mlp effect" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["n_facts"] == 1 and res["bench"] == "counterfact"
    assert cli.main(argv[:-2] + ["--kinds", "mlp,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    # --answer known: the random tiny model does not answer "Paris", so there is nothing to trace
    assert cli.main(argv[:-2] + ["--answer", "known"]) == 2
    assert "knows none of the 1 records" in capsys.readouterr().err


def test_known_facts_keeps_exactly_the_facts_whose_greedy_token_is_the_answer():
    from factedit.eval.trace import known_facts
    from factedit.lm.tokens import encode, encode_target

    lm = tiny_lm("llama")
    tok = lm.tokenizer
    pool = [("The Eiffel Tower is in", "Eiffel Tower"), ("Big Ben is located in", "Big Ben"),
            ("The Colosseum stands in", "Colosseum"), ("Michel Rocard is a native speaker of", "Michel Rocard"),
            ("Toko Yasuda plays the", "Toko Yasuda"), ("Apple was founded by", "Apple"),
            ("The capital of Italy is", "Italy"), ("Microsoft was founded by", "Microsoft"),
            ("Danielle Darrieux is a", "Danielle Darrieux"), ("Paris is a city in", "Paris"),
            ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"), ("Where is the Colosseum", "Colosseum")]
    facts = []
    with torch.no_grad():
        for p, subj in pool:  # one prompt at a time, no padding: the reference
            g = int(lm.model(input_ids=torch.tensor([encode(tok, p)])).logits[0, -1].argmax())
            word = tok.decode([g])
            # the model "knows" a fact when its greedy token is the answer's first token; a random tiny
            # model's greedy token is a word (leading space) for some prompts only
            known = word.startswith(" ") and word.strip() and encode_target(tok, p, word.strip())[1][0] == g
            facts.append((Fact(p, subj, word.strip() if known else "zzqq"), bool(known)))
    expect = [i for i, (_, k) in enumerate(facts) if k]
    assert 2 <= len(expect) < len(facts)  # both kinds present
    facts = [f for f, _ in facts]
    assert known_facts(lm, facts, batch=5) == expect  # batched with padding, across chunks
    assert known_facts(lm, facts, limit=1) == expect[:1]
    with pytest.raises(FactEditError, match="no answer"):
        known_facts(lm, [Fact("The Eiffel Tower is in", "Eiffel Tower")])
