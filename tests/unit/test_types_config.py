import pytest

from factedit import EditRequest, EvalCase, FactEditError
from factedit import config as cfgmod
from factedit.methods.ft import FTConfig
from factedit.methods.reft import LoReFTConfig


def test_request_fills_template_and_validates():
    r = EditRequest("{} is located in", "The Eiffel Tower", "Rome", "Paris", case_id=3)
    assert r.prompt == "The Eiffel Tower is located in"


@pytest.mark.parametrize("kw,msg", [
    (dict(prompt="Paris is nice", subject="Eiffel", target_new="Rome"), "does not occur"),
    (dict(prompt="Eiffel is in", subject="Eiffel", target_new="  "), "'target_new' is empty"),
    (dict(prompt="Eiffel is in", subject="Eiffel", target_new=5), "must be a string"),
    (dict(prompt="Eiffel is in", subject="", target_new="Rome"), "'subject' is empty"),
    (dict(prompt="Eiffel is in", subject="Eiffel", target_new="Rome", target_true="Rome"), "equals target_true"),
])
def test_request_errors_name_the_record(kw, msg):
    with pytest.raises(FactEditError, match=msg) as e:
        EditRequest(**kw, case_id="c7", where="facts.jsonl:4")
    assert "facts.jsonl:4" in str(e.value) and "c7" in str(e.value)


def test_from_dict_missing_field():
    with pytest.raises(FactEditError, match="missing field 'subject'"):
        EditRequest.from_dict({"prompt": "x", "target_new": "y"}, where="f.jsonl:1")


def test_evalcase_needs_true_object_for_neighbours():
    r = EditRequest("Eiffel is in", "Eiffel", "Rome")
    with pytest.raises(FactEditError, match="true object"):
        EvalCase(request=r, neighborhood_prompts=("Louvre is in",))


def test_config_coercion_and_unknown_keys():
    c = cfgmod.build(FTConfig, {"lr": "1e-1"}, {"layer": "4", "steps": 3})
    assert c.lr == 0.1 and c.layer == 4 and c.steps == 3
    r = cfgmod.build(LoReFTConfig, {"layers": "3-5", "positions": "all"})
    assert r.layers == (3, 4, 5)
    assert cfgmod.parse_int_list("1,4-6") == [1, 4, 5, 6]
    with pytest.raises(FactEditError, match="unknown ft config key 'lrr'"):
        cfgmod.build(FTConfig, {"lrr": 1}, what="ft config")
    with pytest.raises(FactEditError, match="cannot read 'abc' as float"):
        cfgmod.build(FTConfig, {"lr": "abc"})
    with pytest.raises(FactEditError, match="key=value"):
        cfgmod.parse_sets(["lr"])


def test_presets_resolve_for_llama():
    data, src = cfgmod.load_preset("ft", "llama", 30)
    assert src is not None and "layer" in data
    assert cfgmod.load_preset("ft", "no-such-family") == ({}, None)


def test_literal_and_domain_are_enforced_with_a_message_naming_the_key():
    from factedit.eval.harness import EvalConfig
    from factedit.methods.locate import AlphaEditConfig, NSEConfig

    assert cfgmod.build(AlphaEditConfig, {"nullspace_mode": "relative", "autocast": "bf16"}).nullspace_mode == "relative"
    for cls, key, bad, msg in [(AlphaEditConfig, "nullspace_mode", "sideways", "not one of"),
                               (AlphaEditConfig, "key_average", "mean", "not one of"),
                               (LoReFTConfig, "positions", "middle", "not one of"),
                               (NSEConfig, "neuron_threshold", "1.5", "out of range"),
                               (FTConfig, "lr", "0", "out of range"), (FTConfig, "steps", "-3", "out of range"),
                               (EvalConfig, "batch_size", "0", "out of range")]:
        with pytest.raises(FactEditError, match=f"'{key}'.*{msg}"):
            cfgmod.build(cls, {key: bad})


def test_the_method_registry_refuses_a_duplicate_name():
    from factedit.registry import list_methods, register

    register("memit", "factedit.methods.locate:MEMITEditor")  # the same class again: a no-op
    with pytest.raises(FactEditError, match="already registered"):
        register("memit", "factedit.methods.ft:FTEditor")
    assert list_methods()["memit"].startswith("MEMIT")


def test_layers_are_checked_against_the_model_when_the_editor_is_created():
    from tiny import tiny_lm

    from factedit import get_editor

    lm = tiny_lm("llama")
    for method, kw in [("memit", {"layers": "1-9"}), ("ft", {"layer": -1}), ("loreft", {"layers": "7"})]:
        with pytest.raises(FactEditError, match="out of range"):
            get_editor(method, lm, **kw)
