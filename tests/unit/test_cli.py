import json

import pytest
import torch
from tiny import locate_requests, strong, tiny_lm

from factedit import cli


@pytest.fixture
def no_model(monkeypatch):
    """Fail loudly if a command loads a model before finishing its input checks."""
    import factedit.lm.load as load

    def boom(*a, **k):
        raise AssertionError("model loaded before input validation")

    monkeypatch.setattr(load, "load_lm", boom)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    lm = tiny_lm("llama")
    d = tmp_path_factory.mktemp("m") / "tiny-llama"
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    return d


def facts(tmp_path, lines, name="facts.jsonl"):
    f = tmp_path / name
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return f


GOOD = {"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "target_new": "Rome", "target_true": "Paris"}


def test_methods_lists_both(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "ft " in out and "loreft" in out


@pytest.mark.parametrize("argv,msg", [
    (["edit", "--method", "nope", "--facts", "x", "--out", "o"], "unknown method 'nope'"),
    (["edit", "--method", "ft", "--set", "lrr=1", "--facts", "x", "--out", "o"], "unknown ft config key 'lrr'"),
    (["edit", "--method", "ft", "--facts", "missing.jsonl", "--out", "o"], "missing.jsonl' does not exist"),
    (["eval", "--method", "ft", "--bench", "zsre", "--data", "nofile.json", "--out", "o"], "nofile.json' does not exist"),
    (["eval", "--method", "ft", "--bench", "zsre", "--data", "x", "--out", "o", "--set", "eval.bogus=1"],
     "unknown eval key 'bogus'"),
    (["eval", "--method", "ft", "--bench", "zsre", "--data", "x", "--out", "o", "--mode", "batch",
      "--set", "eval.after_round=true"], "mode 'batch' has no rounds"),
    (["apply", "--patch", "no-patch-here"], "no-patch-here' does not exist"),
])
def test_bad_input_exits_2_before_model_work(no_model, capsys, argv, msg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_bad_fact_record_is_named(no_model, capsys, tmp_path):
    f = facts(tmp_path, [GOOD, {**GOOD, "subject": "Louvre"}])
    assert cli.main(["edit", "--method", "ft", "--facts", str(f), "--out", str(tmp_path / "o")]) == 2
    assert "facts.jsonl:2" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_unknown_model_name(capsys, tmp_path):
    f = facts(tmp_path, [GOOD])
    assert cli.main(["edit", "--model", "gpt-17", "--method", "ft", "--facts", str(f), "--out", str(tmp_path / "o")]) == 2
    assert "unknown model 'gpt-17'" in capsys.readouterr().err


def test_edit_apply_merge_roundtrip_on_a_local_folder(tmp_path, tiny_folder, capsys):
    f = facts(tmp_path, [GOOD])
    sets = ["--set", "layer=1", "--set", "lr=0.05", "--set", "norm_constraint=1", "--set", "steps=10"]
    assert cli.main(["edit", "--model", str(tiny_folder), "--method", "ft", "--facts", str(f),
                     "--out", str(tmp_path / "p"), *sets]) == 0
    assert (tmp_path / "p" / "manifest.json").exists()
    assert cli.main(["apply", "--model", str(tiny_folder), "--patch", str(tmp_path / "p"), "--merge",
                     "--out", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "before:" in out and "merged model saved" in out
    from factedit.lm.load import load_lm

    base, merged = load_lm(str(tiny_folder)), load_lm(str(tmp_path / "merged"))
    assert base.fingerprint != merged.fingerprint
    # the merged model is refused as a base for the same patch unless forced
    assert cli.main(["apply", "--model", str(tmp_path / "merged"), "--patch", str(tmp_path / "p")]) == 2
    assert "fingerprint" in capsys.readouterr().err


def test_module_patch_cannot_be_merged(tmp_path, tiny_folder, capsys):
    f = facts(tmp_path, [GOOD])
    assert cli.main(["edit", "--model", str(tiny_folder), "--method", "loreft", "--facts", str(f),
                     "--out", str(tmp_path / "p"), "--set", "layers=1", "--set", "steps=2"]) == 0
    assert cli.main(["apply", "--model", str(tiny_folder), "--patch", str(tmp_path / "p"), "--merge",
                     "--out", str(tmp_path / "m")]) == 2
    assert "cannot be merged" in capsys.readouterr().err


def test_eval_command_end_to_end(tmp_path, tiny_folder, capsys):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([{"case_id": 5, "prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower",
                                 "target_new": "Rome", "ground_truth": "Paris", "rephrase_prompt": "Eiffel Tower is in",
                                 "locality_prompt": "Big Ben is in", "locality_ground_truth": "London"}]))
    argv = ["eval", "--model", str(tiny_folder), "--method", "ft", "--bench", "counterfact", "--data", str(data),
            "--mode", "batch", "--out", str(tmp_path / "run"), "--set", "layer=1", "--set", "steps=5",
            "--set", "eval.fluency_cases=0", "--data-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["n_cases"] == 1 and {"pre", "post", "timing"} <= set(s)
    assert "efficacy" in capsys.readouterr().out
    assert cli.main(argv) == 0  # resumes: everything already done


def test_stats_rejects_bad_input_before_loading(no_model, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert cli.main(["stats", "--layers", "1-2", "--corpus", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err
    assert cli.main(["stats", "--layers", "1-2", "--corpus", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["stats", "--layers", "1", "--tokens", "0", "--corpus", str(empty)]) == 2


def test_stats_on_a_local_model(tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "c.txt"
    from tiny import CORPUS

    corpus.write_text("\n\n".join(CORPUS * 10))
    args = ["stats", "--model", str(tiny_folder), "--layers", "1-2", "--corpus", str(corpus), "--tokens", "300",
            "--max-len", "50", "--nullspace", "0.1"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "300" in out and out.count("\n") >= 3
    assert cli.main(args[:3] + ["--layers", "7", "--corpus", str(corpus)]) == 2  # out of range, named
    assert "out of range" in capsys.readouterr().err


def test_methods_lists_locate_family(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(m in out for m in ("rome", "memit", "alphaedit", "nse"))


def test_eval_reuses_pre_edit_records_from_an_earlier_run(tmp_path, tiny_folder, capsys):
    recs = [{"case_id": i, "prompt": f"The Eiffel Tower {i} is in", "subject": f"Eiffel Tower {i}", "target_new": "Rome",
             "ground_truth": "Paris", "rephrase_prompt": f"Eiffel Tower {i} is in", "locality_prompt": "Big Ben is in",
             "locality_ground_truth": "London"} for i in range(3)]
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(recs))
    base = ["eval", "--model", str(tiny_folder), "--bench", "counterfact", "--data", str(data),
            "--set", "eval.fluency_cases=0", "--set", "eval.ppl_tokens=0", "--data-dir", str(tmp_path)]
    assert cli.main(base + ["--method", "ft", "--set", "layer=1", "--pre-only", "--limit", "2", "--out",
                           str(tmp_path / "pre")]) == 0
    argv = base + ["--method", "ft", "--mode", "batch", "--set", "layer=1", "--set", "steps=2",
                   "--out", str(tmp_path / "run"), "--pre-from", str(tmp_path / "pre")]
    assert cli.main(argv) == 0
    pre_a = {r["index"]: r["pre"] for r in map(json.loads, (tmp_path / "pre" / "pre.jsonl").read_text().splitlines())}
    got = [json.loads(x) for x in (tmp_path / "run" / "pre.jsonl").read_text().splitlines()]
    assert len(got) == 3 and all(r["request"]["subject"] == f"Eiffel Tower {r['case_id']}" for r in got)
    for r in got:  # the two shared cases are copied as they were, the third is scored here
        if r["index"] in pre_a:
            assert r["pre"] == pre_a[r["index"]]
    # another data file is refused, and a folder that is not a run before the model loads
    other = tmp_path / "cf2.json"
    other.write_text(json.dumps(recs))
    bad = [a if a != str(data) else str(other) for a in argv]
    bad[bad.index(str(tmp_path / "run"))] = str(tmp_path / "run2")
    assert cli.main(bad) == 2
    assert "another data" in capsys.readouterr().err
    assert cli.main(argv[:-1] + [str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err


@pytest.mark.parametrize("spec,msg", [("tpu", "is not a torch device"), ("mps", "only cpu and cuda"),
                                      ("cuda:7", "cuda:7")])
def test_unknown_or_absent_device_exits_2_before_model_work(no_model, capsys, spec, msg, tmp_path, monkeypatch):
    import torch

    if spec.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--device", spec, "edit", "--method", "ft", "--facts", "x", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_device_defaults_to_cpu_and_follows_the_environment(monkeypatch):
    import torch

    from factedit.lm.load import resolve_device

    monkeypatch.delenv("FACTEDIT_DEVICE", raising=False)
    assert resolve_device(None) == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("FACTEDIT_DEVICE", "tpu")
    with pytest.raises(Exception, match="'tpu' is not a torch device"):
        resolve_device(None)
    assert resolve_device("cpu") == "cpu"  # the argument wins over the environment


def test_commands_without_a_model_ignore_the_device(monkeypatch, capsys):
    monkeypatch.setenv("FACTEDIT_DEVICE", "tpu")
    assert cli.main(["methods"]) == 0
    assert cli.main(["edit", "--method", "ft", "--facts", "x", "--out", "o"]) == 2
    assert "'tpu' is not a torch device" in capsys.readouterr().err


# ---- sequential streams from the command line (edit --on / --state, apply with several patches) ----------------
def _stream_sets(corpus, method):
    kw = strong(corpus, v_steps=6)
    if method == "alphaedit":
        kw.update(nullspace_mode="relative", nullspace_threshold=0.05)
    if method == "nse":
        kw.update(alpha=0.0, upper_bound=1e9)
    return kw, [x for k, v in kw.items() for x in ("--set", f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}")]


@pytest.mark.parametrize("method", ["alphaedit", "nse"])
def test_edit_rounds_with_state_equal_the_in_process_stream(method, tmp_path, tiny_folder, corpus, capsys, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    from factedit import get_editor
    from factedit.lm.load import load_lm
    from factedit.patch.io import load_patch

    kw, sets = _stream_sets(corpus, method)
    reqs = locate_requests()
    f1 = facts(tmp_path, [r.to_dict() for r in reqs[:2]])
    f2 = facts(tmp_path, [reqs[2].to_dict()], "f2.jsonl")
    base = ["edit", "--model", str(tiny_folder), "--method", method, *sets, "--state", str(tmp_path / "st")]
    assert cli.main(base + ["--facts", str(f1), "--out", str(tmp_path / "p1")]) == 0
    assert cli.main(base + ["--facts", str(f2), "--out", str(tmp_path / "p2"), "--on", str(tmp_path / "p1")]) == 0
    assert "on top of 1 earlier round" in capsys.readouterr().out
    state = json.loads((tmp_path / "st" / "state.json").read_text())
    assert len(state["chain"]) == 2 and state["n_facts"] == 3 and state["meta"]["n_committed"] == 3

    # the same stream in one process: round 1 applied and committed, round 2 computed on top
    lm = load_lm(str(tiny_folder))
    ed = get_editor(method, lm, **kw, z_cache=False)
    _, h1 = ed.apply(lm, reqs[:2])
    want = ed.compute(lm, reqs[2:])
    h1.revert()
    got = load_patch(tmp_path / "p2")
    assert got.deltas.keys() == want.deltas.keys()
    for k in want.deltas:
        assert torch.allclose(got.deltas[k].materialise(), want.deltas[k].materialise(), rtol=1e-5, atol=1e-6), k
    # without the state, round 2 is a different edit (the accumulated keys of round 1 are missing)
    alone = get_editor(method, lm, **kw, z_cache=False)
    with load_patch(tmp_path / "p1").apply(lm):
        fresh = alone.compute(lm, reqs[2:])
    assert any(not torch.allclose(fresh.deltas[k].materialise(), want.deltas[k].materialise(), rtol=1e-3, atol=1e-5)
               for k in want.deltas)

    # the rounds merge in order into a model that equals base + p1 + p2
    assert cli.main(["apply", "--model", str(tiny_folder), "--patch", str(tmp_path / "p1"), "--patch",
                     str(tmp_path / "p2"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert "2 patches" in capsys.readouterr().out
    merged = load_lm(str(tmp_path / "merged"))
    with load_patch(tmp_path / "p1").apply(lm), load_patch(tmp_path / "p2").apply(lm):
        for (n, a), (_, b) in zip(lm.model.named_parameters(), merged.model.named_parameters()):
            assert torch.equal(a, b), n


def test_edit_stream_mistakes_are_refused_before_editing(tmp_path, tiny_folder, corpus, capsys, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    _, sets = _stream_sets(corpus, "alphaedit")
    reqs = locate_requests()
    f = facts(tmp_path, [reqs[0].to_dict()])
    base = ["edit", "--model", str(tiny_folder), "--method", "alphaedit", *sets, "--facts", str(f)]
    st, p1 = str(tmp_path / "st"), str(tmp_path / "p1")
    assert cli.main(base + ["--out", p1, "--state", st]) == 0
    before = (tmp_path / "st" / "state.json").read_text()
    capsys.readouterr()

    def refused(argv, msg):
        assert cli.main(base + argv) == 2
        err = capsys.readouterr().err
        assert msg in err, err
        assert not (tmp_path / "o").exists()
        assert (tmp_path / "st" / "state.json").read_text() == before  # the state is untouched

    refused(["--out", str(tmp_path / "o"), "--on", p1], "needs --state DIR")  # accumulated keys would be lost
    refused(["--out", str(tmp_path / "o"), "--state", st], "round 1 of 1 is missing from --on")
    refused(["--out", str(tmp_path / "o"), "--state", st, "--on", p1, "--on", p1], "is not a round of this stream")
    refused(["--out", str(tmp_path / "o"), "--state", str(tmp_path / "new"), "--on", p1], "does not exist, but --on")
    refused(["--out", str(tmp_path / "o"), "--state", st, "--on", p1, "--set", "layers=1"],
            "accumulated with other layers")
    refused(["--out", p1, "--state", st, "--on", p1, "--overwrite"], "--out must be a new folder")
    assert cli.main(["edit", "--model", str(tiny_folder), "--method", "memit", *sets[:-4], "--facts", str(f),
                     "--out", str(tmp_path / "o"), "--state", st, "--on", p1]) == 2
    assert "holds a stream of alphaedit edits, not memit" in capsys.readouterr().err
    # FT keeps no state: editing on top of a patch needs none
    ft = ["--set", "layer=1", "--set", "steps=2"]
    assert cli.main(["edit", "--model", str(tiny_folder), "--method", "ft", *ft, "--facts", str(f),
                     "--out", str(tmp_path / "ft1")]) == 0
    assert cli.main(["edit", "--model", str(tiny_folder), "--method", "ft", *ft, "--facts", str(f),
                     "--out", str(tmp_path / "ft2"), "--on", str(tmp_path / "ft1")]) == 0


def test_interrupted_round_leaves_the_state_behind_and_reruns(tmp_path, tiny_folder, corpus, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    from factedit.methods.base import Editor
    from factedit.patch.io import patch_digest

    _, sets = _stream_sets(corpus, "memit")
    reqs = locate_requests()
    f1 = facts(tmp_path, [r.to_dict() for r in reqs[:2]])
    f2 = facts(tmp_path, [reqs[2].to_dict()], "f2.jsonl")
    base = ["edit", "--model", str(tiny_folder), "--method", "memit", *sets, "--state", str(tmp_path / "st")]
    assert cli.main(base + ["--facts", str(f1), "--out", str(tmp_path / "p1")]) == 0
    round1 = (tmp_path / "st" / "state.json").read_text()
    second = base + ["--facts", str(f2), "--out", str(tmp_path / "p2"), "--on", str(tmp_path / "p1")]
    real = Editor.save_state

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Editor, "save_state", interrupted)
    assert cli.main(second) == 130  # "interrupted; re-run the same command to resume"
    assert (tmp_path / "p2" / "manifest.json").exists()  # the patch was saved, the state not advanced
    assert (tmp_path / "st" / "state.json").read_text() == round1
    first_try = patch_digest(tmp_path / "p2")
    monkeypatch.setattr(Editor, "save_state", real)
    assert cli.main(second) == 0  # the same command replaces the uncommitted round
    state = json.loads((tmp_path / "st" / "state.json").read_text())
    assert state["chain"] == [patch_digest(tmp_path / "p1"), patch_digest(tmp_path / "p2")]
    assert patch_digest(tmp_path / "p2") == first_try  # the same round again
    # a committed round's folder, or any other folder, is not replaced without --overwrite
    assert cli.main(second) == 2
    other = ["--facts", str(f2), "--out", str(tmp_path / "p1"), "--on", str(tmp_path / "p1")]
    assert cli.main(base + other) == 2


def test_edit_reuses_the_statistics_factedit_stats_computed(tmp_path, tiny_folder, corpus, capsys, monkeypatch, caplog):
    """After 'factedit stats --tokens N --corpus FILE', a plain edit uses those statistics (and says so) instead
    of computing the default ones; with several cached and none configured it refuses, listing them."""
    import logging

    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FACTEDIT_DATA", str(tmp_path / "no-data"))  # no default corpus to fall back on
    from factedit import stats as statsmod

    stats_cmd = ["stats", "--model", str(tiny_folder), "--layers", "1-2", "--corpus", corpus, "--max-len", "64"]
    assert cli.main(stats_cmd + ["--tokens", "1500"]) == 0
    computed = []
    real = statsmod._compute
    monkeypatch.setattr(statsmod, "_compute", lambda *a, **k: computed.append(1) or real(*a, **k))
    f = facts(tmp_path, [locate_requests()[0].to_dict()])
    edit = ["edit", "--model", str(tiny_folder), "--method", "memit", "--set", "layers=1-2", "--set", "v_steps=2",
            "--set", "templates_per_length=0", "--facts", str(f)]
    with caplog.at_level(logging.INFO, logger="factedit"):
        assert cli.main(edit + ["--out", str(tmp_path / "p1")]) == 0
    assert not computed and "using the cached key statistics" in caplog.text
    cfg = json.loads((tmp_path / "p1" / "manifest.json").read_text())["config"]
    assert (cfg["mom2_corpus"], cfg["mom2_tokens"], cfg["mom2_max_len"]) == (corpus, 1500, 64)  # recorded
    capsys.readouterr()
    assert cli.main(stats_cmd + ["--tokens", "1000"]) == 0  # a second set of statistics
    computed.clear()
    assert cli.main(edit + ["--out", str(tmp_path / "p2")]) == 2
    err = capsys.readouterr().err
    assert "several key statistics" in err and "mom2_tokens=1000" in err and "mom2_tokens=1500" in err
    assert not (tmp_path / "p2").exists()
    assert cli.main(edit + ["--set", "mom2_tokens=1000", "--set", f"mom2_corpus={corpus}", "--set", "mom2_max_len=64",
                            "--out", str(tmp_path / "p3")]) == 0 and not computed  # named: that one, from the cache
