import gzip
import json

import pytest

from factedit import FactEditError
from factedit.data import load_counterfact, load_facts, load_zsre
from factedit.data.facts import demo_cases

EASY = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
        "subject": "Danielle Darrieux", "ground_truth": "French",
        "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
        "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
ROME = {"case_id": 1, "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux"},
        "paraphrase_prompts": ["Shayna does this. Danielle Darrieux speaks", "Danielle Darrieux's tongue is"],
        "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Jacques Chirac speaks"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"]}
MEND = {"subject": "Ramalinaceae", "src": "Which family does Ramalinaceae belong to?", "pred": "Ramalinales",
        "rephrase": "What family are Ramalinaceae?", "alt": "Lamiinae", "answers": ["Lecanorales"],
        "loc": "nq question: types of skiing in the winter olympics 2018", "loc_ans": "Downhill", "cond": "x"}
KNOWEDIT = {"subject": "ZIC3", "target_new": "male", "prompt": "What species is ZIC3 specific to?",
            "ground_truth": ["human"], "rephrase_prompt": "In which living being can you find ZIC3?",
            "locality": {"Relation_Specificity": [{"prompt": "The strand orientation of ZIC3 is",
                                                   "ground_truth": ["forward strand"]}]}}


def test_counterfact_both_formats(tmp_path):
    f = tmp_path / "cf.json.gz"
    with gzip.open(f, "wt") as g:
        json.dump([EASY, ROME], g)
    a, b = load_counterfact(f)
    assert a.request.target_true == "French" and a.neighborhood_target == "French"
    assert a.paraphrase_prompts == (EASY["rephrase_prompt"],)
    assert b.request.prompt == "The mother tongue of Danielle Darrieux is" and b.request.target_new == "English"
    assert len(b.paraphrase_prompts) == 2 and len(b.neighborhood_prompts) == 2 and b.generation_prompts
    assert load_counterfact(f, limit=1) == [a]


def test_zsre_mend_and_knowedit(tmp_path):
    f = tmp_path / "z.json"
    f.write_text(json.dumps([MEND, KNOWEDIT]))
    a, b = load_zsre(f)
    assert a.request.target_new == "Lecanorales"  # MEMIT protocol: the gold answer
    assert a.locality == (("nq question: types of skiing in the winter olympics 2018?", "Downhill"),)
    assert load_zsre(f, target="alt")[0].request.target_new == "Lamiinae"
    assert b.request.target_new == "male" and b.locality[0] == ("The strand orientation of ZIC3 is", "forward strand")
    assert a.case_id == 0 and b.case_id == 1


def test_facts_jsonl_and_csv(tmp_path):
    j = tmp_path / "f.jsonl"
    j.write_text('{"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "target_new": "Rome"}\n\n'
                 '{"prompt": "{} speaks", "subject": "Danielle", "target_new": "English", "case_id": 9}\n')
    r = load_facts(j)
    assert [x.target_new for x in r] == ["Rome", "English"] and r[1].prompt == "Danielle speaks"
    c = tmp_path / "f.csv"
    c.write_text("prompt,subject,target_new,target_true\nThe Eiffel Tower is in,Eiffel Tower,Rome,Paris\n")
    assert load_facts(c)[0].target_true == "Paris"


@pytest.mark.parametrize("content,msg", [
    ('{"prompt": "x is", "subject": "x", "target_new": "y"}\n{"prompt": "oops"\n', r"f\.jsonl:2: not valid JSON"),
    ('{"prompt": "x is", "subject": "z", "target_new": "y"}\n', r"f\.jsonl:1.*does not occur"),
    ('{"prompt": "x is", "subject": "x", "target_new": ""}\n', r"f\.jsonl:1.*'target_new' is empty"),
    ('{"prompt": "x is", "subject": "x", "target_new": 3}\n', r"f\.jsonl:1.*must be a string"),
    ('{"prompt": "x is", "subject": "x"}\n', r"f\.jsonl:1.*missing field 'target_new'"),
    ('', r"no facts"),
])
def test_bad_fact_files_name_the_record(tmp_path, content, msg):
    f = tmp_path / "f.jsonl"
    f.write_text(content)
    with pytest.raises(FactEditError, match=msg):
        load_facts(f)


def test_bad_benchmark_files(tmp_path):
    with pytest.raises(FactEditError, match="does not exist"):
        load_counterfact(tmp_path / "missing.json")
    f = tmp_path / "bad.json"
    f.write_text("[{")
    with pytest.raises(FactEditError, match=r"bad\.json: not valid JSON"):
        load_counterfact(f)
    f.write_text(json.dumps([{**EASY, "subject": "Nobody"}]))
    with pytest.raises(FactEditError, match=r"bad\.json\[0\] case_id=0: subject 'Nobody' does not occur"):
        load_counterfact(f)
    f.write_text(json.dumps([{k: v for k, v in MEND.items() if k != "loc"}]))
    with pytest.raises(FactEditError, match=r"missing field 'loc'"):
        load_zsre(f)


def test_demo_cases_ship_inside_the_package():
    cases = demo_cases()
    assert len(cases) == 5 and all(c.neighborhood_prompts and c.paraphrase_prompts for c in cases)
