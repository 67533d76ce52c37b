"""bench/compare_runs.py: the paired sign test and the record matching."""

import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("compare_runs", Path(__file__).parents[2] / "bench" / "compare_runs.py")
cr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cr)


def test_sign_test_matches_the_binomial_tail():
    assert cr.sign_test(0, 0) == 1.0
    assert cr.sign_test(5, 5) == 1.0
    assert cr.sign_test(0, 5) == pytest.approx(2 / 32)  # both tails of Bin(5, 1/2) at 0
    assert cr.sign_test(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert cr.sign_test(8, 2) == cr.sign_test(2, 8)


def write_run(folder: Path, post_by_case: dict[int, dict]) -> Path:
    folder.mkdir()
    with open(folder / "cases.jsonl", "w") as f:
        for cid, post in post_by_case.items():
            f.write(json.dumps({"case_id": cid, "post": post}) + "\n")
    return folder


def test_compare_uses_shared_records_only(tmp_path):
    a = cr.load_cases(write_run(tmp_path / "a", {1: {"specificity": 1.0}, 2: {"specificity": 1.0},
                                                   3: {"specificity": 0.0}, 9: {"specificity": 1.0}}))
    b = cr.load_cases(write_run(tmp_path / "b", {1: {"specificity": 0.0}, 2: {"specificity": 1.0},
                                                   3: {"specificity": 0.0}}))
    res = cr.compare({"a": a, "b": b}, ["specificity"])
    assert res["n_records"] == 3  # case 9 is only in a
    assert res["means"] == {"a": {"specificity": pytest.approx(200 / 3, abs=0.01)}, "b": {"specificity": pytest.approx(100 / 3, abs=0.01)}}
    (p,) = res["pairs"]
    assert (p["a_better"], p["b_better"]) == (1, 0) and p["p_two_sided"] == 1.0


def test_bad_run_folder_is_named(tmp_path):
    with pytest.raises(SystemExit, match="cases.jsonl: not found"):
        cr.load_cases(tmp_path)
    (tmp_path / "cases.jsonl").write_text('{"case_id": 1}\n')
    with pytest.raises(SystemExit, match=r"cases.jsonl:1: not a case record"):
        cr.load_cases(tmp_path)


def test_pooled_runs_join_disjoint_samples_and_refuse_overlap(tmp_path):
    a = write_run(tmp_path / "a", {1: {"specificity": 1.0}, 2: {"specificity": 0.0}})
    b = write_run(tmp_path / "b", {3: {"specificity": 1.0}})
    c = write_run(tmp_path / "c", {2: {"specificity": 1.0}})
    pooled = cr.load_pooled(f"{a},{b}")
    assert pooled == {1: {"specificity": 1.0}, 2: {"specificity": 0.0}, 3: {"specificity": 1.0}}
    with pytest.raises(SystemExit, match=r"case_id 2 is in both .*a and .*c"):
        cr.load_pooled(f"{a},{c}")
