import json

import pytest
from tiny import assert_records_close, tiny_lm

from factedit import EditRequest, EvalCase, FactEditError, get_editor
from factedit.eval.harness import EvalConfig, Runner
from factedit.fsutil import read_jsonl

FT = dict(layer=1, lr=0.05, norm_constraint=1.0, steps=15)
ECFG = EvalConfig(batch_size=4, ppl_tokens=64, ppl_window=16, fluency_cases=1, gen_length=12)
TEXT = "The Eiffel Tower is in Paris . The Colosseum is in Rome . Big Ben is in London . " * 10


def cf_cases():
    raw = [("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris", "Big Ben is in"),
           ("The capital of Italy is", "Italy", "London", "Rome", "The Colosseum is in"),
           ("Toko Yasuda plays the", "Toko Yasuda", "piano", "guitar", "Who plays the"),
           ("Apple was founded by", "Apple", "Bill Gates", "Steve Jobs", "Steve Jobs founded")]
    return [EvalCase(request=EditRequest(p, s, n, t, case_id=i), paraphrase_prompts=(f"Where is it ? {p}",),
                     neighborhood_prompts=(nb,), generation_prompts=(p,))
            for i, (p, s, n, t, nb) in enumerate(raw)]


def zsre_cases():
    return [EvalCase(request=EditRequest("What is the language of Danielle Darrieux ?", "Danielle Darrieux",
                                         "English", case_id=0),
                     paraphrase_prompts=("Danielle Darrieux speaks",), locality=(("The capital of France is", "Paris"),))]


def run(tmp_path, name, mode, cases=None, bench="counterfact", eval_cfg=ECFG, **kw):
    lm = tiny_lm("llama")
    kw.setdefault("edit_batch", 2 if mode == "sequential" else None)
    return Runner(lm, get_editor("ft", lm, **FT), cases or cf_cases(), bench=bench, mode=mode, out=tmp_path / name,
                  eval_cfg=eval_cfg, general_text=TEXT, **kw).run()


@pytest.mark.parametrize("mode", ["batch", "sequential", "single"])
def test_modes_write_run_folder_and_summary(tmp_path, mode):
    s = run(tmp_path, mode, mode)
    out = tmp_path / mode
    for f in ("run.json", "pre.jsonl", "cases.jsonl", "summary.json", "timing.json"):
        assert (out / f).exists(), f
    assert s["n_cases"] == 4 and s["mode"] == mode and s["method"] == "ft" and s["bench"] == "counterfact"
    for phase in ("pre", "post"):
        for k in ("efficacy", "generalization", "specificity"):
            assert 0 <= s[phase][k] <= 100
    assert s["post"]["efficacy"] > s["pre"]["efficacy"]
    assert s["timing"]["edit_s"] > 0 and s["timing"]["eval_s"] > 0
    recs = [json.loads(x) for x in (out / "cases.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in recs) == [0, 1, 2, 3] and all("pre" in r and "post" in r for r in recs)
    if mode != "single":
        assert s["pre"]["perplexity"] > 1 and "fluency" in s["post"]
    assert (out / ("rounds/0001" if mode == "sequential" else "patch")).exists() or mode == "single"


def interrupt_second_compute(monkeypatch) -> dict:
    """FT's second patch computation raises KeyboardInterrupt; the returned dict counts the calls."""
    from factedit.methods import ft

    calls = {"n": 0}
    orig = ft.FTEditor._compute

    def flaky(self, lm, reqs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return orig(self, lm, reqs)

    monkeypatch.setattr(ft.FTEditor, "_compute", flaky)
    return calls


def test_interrupted_sequential_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    full = run(tmp_path, "full", "sequential")
    calls = interrupt_second_compute(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "resumed", "sequential")
    assert (tmp_path / "resumed" / "rounds" / "0000").exists()
    assert not (tmp_path / "resumed" / "rounds" / "0001").exists()
    resumed = run(tmp_path, "resumed", "sequential")
    assert calls["n"] == 3  # round 0 was loaded from disk, not recomputed
    assert resumed["post"] == full["post"] and resumed["pre"] == full["pre"]


def test_run_folder_of_another_run_is_refused(tmp_path):
    run(tmp_path, "r", "batch")
    with pytest.raises(FactEditError, match="holds a different run .*mode"):
        run(tmp_path, "r", "sequential")


def test_zsre_bench_reports_token_accuracy_and_agreement(tmp_path):
    s = run(tmp_path, "z", "batch", cases=zsre_cases(), bench="zsre")
    assert set(s["pre"]) >= {"efficacy", "generalization", "specificity"}
    assert "locality" in s["post"] and 0 <= s["post"]["locality"] <= 100


def test_pre_only_evaluates_the_unedited_model(tmp_path, monkeypatch):
    from factedit.methods import ft

    monkeypatch.setattr(ft.FTEditor, "_compute", lambda *a: (_ for _ in ()).throw(AssertionError("edited")))
    s = run(tmp_path, "pre", "batch", pre_only=True)
    assert s["method"] == "none" and s["n_cases"] == 4 and s["post"] == {} and "efficacy" in s["pre"]


def test_after_round_scores_each_round_right_after_it(tmp_path):
    import dataclasses

    cfg = dataclasses.replace(ECFG, after_round=True)
    s = run(tmp_path, "ar", "sequential", eval_cfg=cfg)
    out = tmp_path / "ar"
    after = {r["index"]: r for r in map(json.loads, (out / "after_round.jsonl").read_text().splitlines())}
    assert {i: r["round"] for i, r in after.items()} == {0: 0, 1: 0, 2: 1, 3: 1}  # edit_batch 2: two rounds
    end = {r["index"]: r for r in map(json.loads, (out / "cases.jsonl").read_text().splitlines())}
    # the last round is scored on the same model right after it and at the end: the same scores, up to the
    # float error of another batch shape (after the round: its 2 cases; at the end: all 4)
    for i in (2, 3):
        assert_records_close(after[i]["post"]["raw"], end[i]["post"]["raw"])
    # round 0's records were scored before round 1 was applied: FT's second round moves them (far beyond 1e-4)
    nll = lambda rec: [x["nll"] for x in rec["post"]["raw"]["rewrite"]]  # noqa: E731
    assert any(abs(a - b) > 1e-2 for i in (0, 1) for a, b in zip(nll(after[i]), nll(end[i])))
    assert [r["round"] for r in s["by_round"]] == [0, 1] and all(r["n"] == 2 for r in s["by_round"])
    assert_records_close(s["by_round"][1]["after_round"], s["by_round"][1]["at_end"])
    from factedit.eval.metrics import aggregate

    want = aggregate([{k: v for k, v in after[i]["post"].items() if k != "raw"} for i in range(4)])
    assert s["after_round"] == want and s["after_round"]["efficacy"] > s["pre"]["efficacy"]  # same records: exact
    from factedit.eval.report import table

    assert "right after each round: efficacy" in table(s)
    # a re-run resumes without scoring anything again, and without after_round the summary has no such keys
    again = run(tmp_path, "ar", "sequential", eval_cfg=cfg)
    assert len((out / "after_round.jsonl").read_text().splitlines()) == 4 and again["by_round"] == s["by_round"]
    assert "by_round" not in run(tmp_path, "plain", "sequential")


def test_after_round_resumes_after_an_interruption(tmp_path, monkeypatch):
    import dataclasses

    cfg = dataclasses.replace(ECFG, after_round=True)
    full = run(tmp_path, "full", "sequential", eval_cfg=cfg)
    interrupt_second_compute(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "resumed", "sequential", eval_cfg=cfg)
    assert len((tmp_path / "resumed" / "after_round.jsonl").read_text().splitlines()) == 2  # round 0 only
    resumed = run(tmp_path, "resumed", "sequential", eval_cfg=cfg)
    assert resumed["by_round"] == full["by_round"] and resumed["after_round"] == full["after_round"]


def test_old_run_folder_without_a_newer_eval_setting_still_resumes(tmp_path):
    s = run(tmp_path, "old", "batch")
    cfg_path = tmp_path / "old" / "run.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["eval"]["after_round"]  # as written before the setting existed
    cfg_path.write_text(json.dumps(cfg))
    assert run(tmp_path, "old", "batch")["post"] == s["post"]


def test_after_round_outside_sequential_mode_is_refused_before_any_work(tmp_path):
    import dataclasses

    with pytest.raises(FactEditError, match="after_round .* mode 'batch' has no rounds"):
        run(tmp_path, "b", "batch", eval_cfg=dataclasses.replace(ECFG, after_round=True))
    assert not (tmp_path / "b").exists()


def test_an_unknown_benchmark_is_refused_by_name(tmp_path):
    from factedit.eval.benches import BENCHMARKS, Benchmark, register_benchmark

    with pytest.raises(FactEditError, match="unknown benchmark 'mquak'.*counterfact"):
        run(tmp_path, "x", "batch", bench="mquak")
    assert not (tmp_path / "x").exists()
    with pytest.raises(FactEditError, match="already registered"):
        register_benchmark(Benchmark("zsre", "x", *(lambda *a: None,) * 3))
    assert set(BENCHMARKS) >= {"counterfact", "zsre"}


def test_a_case_with_several_edits_applies_them_all(tmp_path):
    two = EvalCase(request=EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris", case_id=0),
                   extra_requests=(EditRequest("The capital of Italy is", "Italy", "London", "Rome", case_id=0),),
                   neighborhood_prompts=("Big Ben is in",))
    seen = []
    lm = tiny_lm("llama")
    ed = get_editor("ft", lm, **FT)
    real = ed.compute
    ed.compute = lambda lm_, reqs: seen.append([r.subject for r in reqs]) or real(lm_, reqs)
    s = Runner(lm, ed, [two], bench="counterfact", mode="single", out=tmp_path / "two", eval_cfg=ECFG,
               general_text=TEXT).run()
    assert seen == [["Eiffel Tower", "Italy"]]
    rec = json.loads((tmp_path / "two" / "cases.jsonl").read_text().splitlines()[0])
    assert {"rewrite", "rewrite@1", "rewrite_true@1"} <= set(rec["post"]["raw"])  # each edit is probed
    assert s["post"]["efficacy"] == 100.0
    with pytest.raises(FactEditError, match="must be EditRequest"):
        EvalCase(request=two.request, extra_requests=("not a request",))


def test_batch_mode_in_calls_edits_each_call_on_the_unedited_model(tmp_path):
    cases = cf_cases()
    assert len(cases) >= 4
    s = run(tmp_path, "calls", "batch", cases=cases[:4], edit_batch=2)
    assert s["edit_batch"] == 2 and s["n_cases"] == 4
    assert sorted(p.name for p in (tmp_path / "calls" / "calls").iterdir()) == ["0000", "0001"]
    recs = {r["index"]: r for r in read_jsonl(tmp_path / "calls" / "cases.jsonl")}
    for k, part in enumerate((cases[:2], cases[2:4])):  # each call equals a batch run of its facts alone
        alone = run(tmp_path, f"alone{k}", "batch", cases=part)
        assert alone["edit_batch"] is None
        for r in read_jsonl(tmp_path / f"alone{k}" / "cases.jsonl"):
            assert_records_close(recs[r["index"] + 2 * k]["post"], r["post"])
    with pytest.raises(FactEditError, match="single mode"):
        run(tmp_path, "single", "single", edit_batch=2)


def test_counterfact_neighbourhood_agreement_compares_argmax_tokens_with_the_unedited_model(tmp_path):
    s = run(tmp_path, "agree", "batch")
    recs = read_jsonl(tmp_path / "agree" / "cases.jsonl")
    pre = {r["index"]: r["pre"] for r in read_jsonl(tmp_path / "agree" / "pre.jsonl")}
    for r in recs:
        a = r["post"]["raw"]["neighborhood_true"][0]["argmax"]
        b = pre[r["index"]]["raw"]["neighborhood_true"][0]["argmax"]
        assert r["post"]["neighborhood_agreement"] == pytest.approx(sum(x == y for x, y in zip(a, b)) / len(a))
    assert 0.0 <= s["post"]["neighborhood_agreement"] <= 100.0  # summaries in percent


def test_true_paraphrases_are_the_prompts_with_a_prefix_sentence():
    from factedit.data.counterfact import is_true_paraphrase

    assert is_true_paraphrase("One person killed. Heath Brothers plays", "Heath Brothers")
    assert is_true_paraphrase("Ádám Rajhona, 72, Hungarian actor. The twin city of Kharkiv is", "Kharkiv")
    assert not is_true_paraphrase("Where Danielle Darrieux is from, people speak the language of", "Danielle Darrieux")
    assert not is_true_paraphrase("Ferrari F40 is sold by", "Ferrari F40")
    assert not is_true_paraphrase("Mr. Smith lives in", "Paris")  # no subject mention: not a paraphrase of it


def test_generation_protocol_scores_greedy_answers_by_exact_match(tmp_path):
    import dataclasses

    from factedit.eval.generation import generation_metrics, score_generation
    from factedit.lm.generate import greedy_answers

    cfg = dataclasses.replace(ECFG, protocol="generation", template="Q: {q}\nA:", max_new_tokens=5, ppl_tokens=0,
                              fluency_cases=0)
    s = run(tmp_path, "gen", "batch", eval_cfg=cfg)
    recs = read_jsonl(tmp_path / "gen" / "cases.jsonl")
    lm = tiny_lm("llama")
    cases = cf_cases()
    # the pre-edit record holds the unedited model's own answers to the template-wrapped prompts
    want = greedy_answers(lm, ["Q: " + c.neighborhood_prompts[0] + "\nA:" for c in cases], max_new_tokens=5)
    assert [r["pre"]["raw"]["answers"]["locality"][0] for r in recs] == want
    for r in recs:
        post = r["post"]
        assert set(post) >= {"efficacy", "generalization", "locality", "efficacy_acc", "generalization_acc"}
        # exact match, recomputed from the stored answers
        tgt = r["request"]["target_new"].lower()
        ans = post["raw"]["answers"]["rewrite"][0].split("\n")[0].strip().rstrip(".").strip().lower()
        assert post["efficacy"] == float(ans == tgt)
    assert 0 <= s["post"]["locality"] <= 100 and "locality" not in s["pre"]
    # the metric itself: case-insensitive, cut at a newline, one trailing "." removed; locality against pre
    rec = {"answers": {"rewrite": [" rome.\nB: x"], "paraphrase": ["Paris"], "locality": ["London"]},
           "targets": {"rewrite": ["Rome"], "paraphrase": ["Rome"]}}
    m = generation_metrics(rec, {"raw": {"answers": {"locality": ["London."]}}})
    assert m == {"efficacy": 1.0, "generalization": 0.0, "locality": 1.0}
    assert score_generation(lm, cases[:1], "{q}", 3)[0]["answers"]["rewrite"] == \
        greedy_answers(lm, [cases[0].request.prompt], max_new_tokens=3)
