"""Trained editors: fit, save_pretrained / from_pretrained, a resumable 'factedit train', --editor on edit/eval."""

import json

import pytest
import torch
from tiny import tiny_lm

from factedit import EditRequest, EvalCase, FactEditError, cli
from factedit.errors import FingerprintMismatch
from factedit.eval.scoring import score_targets
from factedit.registry import register, unregister

TRAIN = [("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris"), ("The capital of Italy is", "Italy", "London", "Rome"),
         ("Toko Yasuda plays the", "Toko Yasuda", "piano", "guitar"), ("Big Ben is in", "Big Ben", "Paris", "London")]


@pytest.fixture(autouse=True)
def toy_method():
    register("toy", "toy_trained:ToyEditor", "a trained editor for tests")
    yield
    unregister("toy")


def cases():
    return [EvalCase(EditRequest(p, s, n, t, case_id=i)) for i, (p, s, n, t) in enumerate(TRAIN)]


def test_fit_save_load_and_refusals(tmp_path, caplog):
    import logging

    from factedit import get_editor
    from factedit.registry import get_editor_class

    lm = tiny_lm("llama")
    ed = get_editor("toy", lm)
    reqs = [c.request for c in cases()]
    with pytest.raises(FactEditError, match="train it first"):
        ed.compute(lm, reqs)
    before = [s.nll for s in score_targets(lm, [r.prompt for r in reqs], [r.target_new for r in reqs])]
    with caplog.at_level(logging.INFO, logger="factedit.methods.train"):
        metrics = ed.fit(lm, cases())
    assert metrics["passes"] == 12
    assert "toy: pass 4/12 loss" in caplog.text and "toy: pass 12/12 loss" in caplog.text  # logged losses
    ed.save_pretrained(tmp_path / "toy")
    man = json.loads((tmp_path / "toy" / "editor.json").read_text())
    assert man["method"] == "toy" and man["base_fingerprint"] == lm.fingerprint and man["format_version"] == 1
    assert man["data_digest"] and man["metrics"]["loss"] == metrics["loss"] and man["config"]["layer"] == 2
    back = get_editor_class("toy").from_pretrained(tmp_path / "toy", lm)
    for (k, a), (_, b) in zip(ed.shift.state_dict().items(), back.shift.state_dict().items()):
        assert torch.equal(a, b), k  # read back from disk: bit-exact
    with back.compute(lm, reqs).apply(lm):
        after = [s.nll for s in score_targets(lm, [r.prompt for r in reqs], [r.target_new for r in reqs])]
    assert sum(after) < sum(before) - 1.0  # the trained map moves the training targets
    other = tiny_lm("qwen2")
    with pytest.raises(FingerprintMismatch, match="trained on a model"):
        get_editor_class("toy").from_pretrained(tmp_path / "toy", other)


def _write_cf(path, rows):
    path.write_text(json.dumps([{"case_id": i, "prompt": p, "subject": s, "target_new": n, "ground_truth": t}
                                for i, (p, s, n, t) in enumerate(rows)]))
    return path


def test_cli_train_resumes_after_a_kill_to_the_same_editor(tmp_path, monkeypatch):
    lm = tiny_lm("llama")
    model = tmp_path / "tiny-llama"
    lm.model.save_pretrained(model)
    lm.tokenizer.save_pretrained(model)
    data = _write_cf(tmp_path / "train.json", TRAIN)
    base = ["train", "--method", "toy", "--model", str(model), "--data", str(data)]
    assert cli.main(base + ["--out", str(tmp_path / "a")]) == 0
    from factedit.methods import train as trainmod

    real = trainmod.save_checkpoint
    n = {"saves": 0}

    def die_after_five(*a, **k):
        real(*a, **k)
        n["saves"] += 1
        if n["saves"] == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainmod, "save_checkpoint", die_after_five)
    assert cli.main(base + ["--out", str(tmp_path / "b")]) == 130
    assert (tmp_path / "b.partial" / "state" / "state.json").exists() and not (tmp_path / "b").exists()
    monkeypatch.setattr(trainmod, "save_checkpoint", real)
    # another training config cannot resume this one
    assert cli.main(base + ["--out", str(tmp_path / "b"), "--set", "lr=0.01"]) == 2
    assert cli.main(base + ["--out", str(tmp_path / "b")]) == 0
    assert not (tmp_path / "b.partial").exists()
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / x / "editor.safetensors")) for x in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same computation, resumed
    # --editor on edit and eval
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"prompt": TRAIN[0][0], "subject": TRAIN[0][1], "target_new": "Rome"}) + "\n")
    assert cli.main(["edit", "--method", "toy", "--model", str(model), "--editor", str(tmp_path / "a"),
                     "--facts", str(facts), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "manifest.json").exists()
    assert cli.main(["eval", "--method", "toy", "--model", str(model), "--editor", str(tmp_path / "a"), "--bench",
                     "counterfact", "--data", str(data), "--set", "eval.ppl_tokens=0", "--set", "eval.fluency_cases=0",
                     "--out", str(tmp_path / "run")]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["trained_editor"]["data_digest"] == json.loads((tmp_path / "a" / "editor.json").read_text())["data_digest"]
    # refusals before the model loads: not a trained method, not an editor folder, untrained method for train
    assert cli.main(["edit", "--method", "ft", "--model", str(model), "--editor", str(tmp_path / "a"), "--facts",
                     str(facts), "--out", str(tmp_path / "q")]) == 2
    assert cli.main(["edit", "--method", "toy", "--model", str(model), "--editor", str(tmp_path), "--facts",
                     str(facts), "--out", str(tmp_path / "q")]) == 2
    assert cli.main(["train", "--method", "ft", "--model", str(model), "--data", str(data), "--out",
                     str(tmp_path / "ft")]) == 2
