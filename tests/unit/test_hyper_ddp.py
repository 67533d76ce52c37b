"""MALMEN meta-training under torchrun: two gloo ranks, each capturing and scoring its share of every edit batch,
train the same hyper-network as one process on the whole batch."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file
from tiny import tiny_lm

from factedit import cli

ROWS = [("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris", "Where is the Eiffel Tower? It is in", "Big Ben is in", "London"),
        ("The capital of Italy is", "Italy", "London", "Rome", "Italy has the capital", "The capital of France is", "Paris"),
        ("Toko Yasuda plays the", "Toko Yasuda", "piano", "guitar", "Toko Yasuda is a musician who plays the", "Who plays the", "drums"),
        ("Apple was founded by", "Apple", "Bill Gates", "Steve Jobs", "The founder of Apple is", "Microsoft was founded by", "Bill"),
        ("Danielle Darrieux speaks", "Danielle Darrieux", "English", "French", "The mother tongue of Danielle Darrieux is", "Jean Gabin speaks", "French"),
        ("Edwin of Northumbria follows", "Edwin of Northumbria", "Islam", "Christianity", "Edwin of Northumbria is a", "Oswald follows", "Christianity"),
        ("Autonomous University of Madrid is in", "Autonomous University of Madrid", "Sweden", "Spain", "The university is located in", "Madrid is in", "Spain")]


def _data(path):
    path.write_text(json.dumps([{"case_id": i, "prompt": p, "subject": s, "target_new": n, "ground_truth": t,
                                 "rephrase_prompt": r, "locality_prompt": lp, "locality_ground_truth": lg}
                                for i, (p, s, n, t, r, lp, lg) in enumerate(ROWS)]))
    return path


def test_two_gloo_ranks_under_torchrun_train_the_same_networks_as_one_process(tmp_path):
    lm = tiny_lm("llama")
    model = tmp_path / "tiny-llama"
    lm.model.save_pretrained(model)
    lm.tokenizer.save_pretrained(model)
    data = _data(tmp_path / "train.json")
    # 7 facts in edit batches of 4 then 3: the ranks' shares are 2+2, then 2+1 (uneven on purpose)
    args = ["train", "--method", "malmen", "--model", str(model), "--data", str(data), "--set", "layers=[2,3]",
            "--set", "rank=4", "--set", "edit_batch=4", "--set", "lm_batch=2", "--set", "meta_lr=0.01",
            "--set", "epochs=2", "--set", "eta_init=0.01", "--set", "eta_search=false", "--set", "val_size=0"]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FACTEDIT_PREFIX_CACHE": str(tmp_path / "prefix2")}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "factedit.cli", *args, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "meta-training on 2 ranks" in res.stderr
    one = load_file(str(tmp_path / "one" / "editor.safetensors"))
    two = load_file(str(tmp_path / "two" / "editor.safetensors"))
    assert one.keys() == two.keys()
    moved = False
    for k in one:
        # float32 sums in other groupings (sub-batches, the gathered rows), then Adam: where a gradient is near
        # zero, Adam's step is about lr·sign(g), so rounding moves such entries by up to ~1e-4 of the tensor's
        # scale. A wrong weighting of the ranks' shares (uneven in the second batch) moves them by ~lr.
        scale = float(one[k].abs().max())
        torch.testing.assert_close(two[k], one[k], rtol=1e-3, atol=1e-3 * scale, msg=k)
        moved |= k.endswith("::B.0") and bool(one[k].abs().sum() > 0)
    assert moved  # B starts at zero: meta-training moved it
    man = json.loads((tmp_path / "two" / "editor.json").read_text())
    assert man["ranks"] == 2 and not (tmp_path / "two.partial").exists()
