"""The evaluation runner: single, batch and sequential editing with resumable run folders.

A run folder holds ``run.json`` (the resolved configuration), ``pre.jsonl`` (pre-edit records),
``cases.jsonl`` (pre and post per case, written as it goes), the saved patches (``patch/`` in batch
mode, ``rounds/NNNN/`` in sequential mode), ``after_round.jsonl`` (sequential mode with ``after_round``: each
round's records scored right after that round), ``general.json`` (perplexity, fluency), ``timing.json``
and finally ``summary.json``. Re-running the same command resumes where it stopped; a folder that
holds a different run is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any, Literal

from tqdm.auto import tqdm

from .. import config as cfgmod
from ..config import NonNegInt, PosInt
from ..errors import FactEditError
from ..fsutil import JsonlWriter, read_jsonl, write_json
from ..lm.generate import sample_batch
from ..lm.load import LM
from ..methods.base import Editor
from ..patch.base import Patch
from ..patch.io import load_patch, patch_digest
from ..stream import EditStream
from ..types import EvalCase
from .benches import get_benchmark
from .metrics import HEADLINE, aggregate, case_metrics, score_cases
from .scoring import ngram_entropy, perplexity

log = logging.getLogger(__name__)
MODES = ("single", "batch", "sequential")


@dataclass(frozen=True)
class EvalConfig:
    batch_size: PosInt = 32  # prompts per scoring forward pass
    ppl_tokens: NonNegInt = 16384  # WikiText-2 tokens for perplexity (0: skip)
    ppl_window: PosInt = 512  # tokens per perplexity window
    fluency_cases: NonNegInt = 25  # cases whose generation prompts are sampled for fluency (0: skip)
    gen_length: PosInt = 100  # total tokens (prompt + continuation) per generated text (CounterFact: 100)
    gen_top_k: PosInt = 5  # top-k sampling for fluency (CounterFact: 5)
    seed: int = 0
    # Sequential mode: also score each round's records right after that round (on the model edited up to
    # it), besides once at the end of the stream. The summary then reports both, overall and per round:
    # how well each round's edits took, and how much of them the later rounds left standing.
    after_round: bool = False
    # "bench": the benchmark's own teacher-forced protocol; "generation": greedy answers after the question template,
    # exact match (the massive-editing papers' protocol, eval/generation.py)
    protocol: Literal["bench", "generation"] = "bench"
    template: str = "auto"  # the question template of the generation protocol ({q}: the prompt); auto: per family
    max_new_tokens: PosInt = 20  # the generation protocol's answer length


def _timing(out: Path) -> dict[str, float]:
    p = out / "timing.json"
    return json.loads(p.read_text()) if p.exists() else {"edit_s": 0.0, "eval_s": 0.0}


def _add_time(out: Path, key: str, seconds: float) -> None:
    t = _timing(out)
    t[key] = t.get(key, 0.0) + seconds
    write_json(out / "timing.json", t)


def _chunks(n: int, k: int) -> list[list[int]]:
    """Indices 0..n-1 in consecutive groups of k (the last may be shorter)."""
    return [list(range(s, min(s + k, n))) for s in range(0, n, k)]


class Runner:
    def __init__(self, lm: LM, editor: Editor, cases: list[EvalCase], *, bench: str, mode: str, out: Path,
                 edit_batch: int | None = None, eval_cfg: EvalConfig | None = None, general_text: str | None = None,
                 data: str | None = None, pre_only: bool = False, pre_from: Path | None = None) -> None:
        if mode not in MODES:
            raise FactEditError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
        get_benchmark(bench)  # an unknown benchmark is refused by name
        if not cases:
            raise FactEditError("no evaluation cases")
        if edit_batch is not None and edit_batch < 1:
            raise FactEditError("--batch-size must be at least 1")
        if mode == "sequential" and edit_batch is None:
            edit_batch = 100
        if mode == "single" and edit_batch is not None:
            raise FactEditError("--batch-size has no meaning in single mode (one fact per edit)")
        self.lm, self.editor, self.cases, self.bench, self.mode = lm, editor, cases, bench, mode
        self.out, self.edit_batch = Path(out), edit_batch
        self.cfg = eval_cfg or EvalConfig()
        if self.cfg.protocol == "generation" and self.cfg.template == "auto":
            from .generation import question_template

            self.cfg = dataclasses.replace(self.cfg, template=question_template(lm))
        check_mode(self.cfg, mode)
        self.general_text = general_text
        self.pre_only = pre_only
        self.pre_from = Path(pre_from) if pre_from else None
        self.run_config = {
            "method": editor.name, "method_config": editor.config_dict(), "preset": editor.preset,
            "model": lm.name, "fingerprint": lm.fingerprint, "bench": bench, "data": data, "mode": mode,
            "n_cases": len(cases), "case_ids": [c.case_id for c in cases][:5],
            "edit_batch": edit_batch,
            "eval": dataclasses.asdict(self.cfg), "general_text": bool(general_text), "pre_only": pre_only,
        }
        trained = getattr(editor, "trained", None)
        if trained:  # a trained editor: which one (a resumed run must use the same)
            self.run_config["trained_editor"] = {k: trained.get(k) for k in ("base_fingerprint", "data_digest")}

    # ---- run folder ---------------------------------------------------------------------------------
    def _open_folder(self) -> None:
        cfg_path = self.out / "run.json"
        if cfg_path.exists():
            old = json.loads(cfg_path.read_text())
            if isinstance(old.get("eval"), dict):  # folders written before an eval setting existed: its default
                old["eval"] = {**dataclasses.asdict(EvalConfig()), **old["eval"]}
            if old != json.loads(json.dumps(self.run_config, default=str)):
                diff = [k for k in self.run_config if old.get(k) != json.loads(json.dumps(self.run_config[k], default=str))]
                raise FactEditError(f"run folder '{self.out}' holds a different run (differs in: {', '.join(diff)}); "
                                    "choose another --out")
            log.info("resuming run in %s", self.out)
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(cfg_path, self.run_config)

    # ---- phases -------------------------------------------------------------------------------------
    def _score(self, idx: list[int], desc: str) -> list[dict]:
        return score_cases(self.lm, [self.cases[i] for i in idx], self.bench, self.cfg.batch_size, desc=desc,
                           protocol=self.cfg.protocol, template=self.cfg.template,
                           max_new_tokens=self.cfg.max_new_tokens)

    def _reused_pre(self) -> dict[int, dict]:
        """Pre-edit records of the same cases from an earlier run folder (``pre_from``): the unedited
        model's scores do not depend on the method, so runs on one benchmark can share them. The
        folder must hold a run (run.json with eval settings) of the same model (fingerprint), bench
        and data file; a record is taken only where its index, case id and request match this run's."""
        src = self.pre_from
        try:
            cfg = json.loads((src / "run.json").read_text())
        except (OSError, ValueError):
            raise FactEditError(f"--pre-from {src}: no readable run.json there") from None
        for key in ("fingerprint", "bench", "data"):
            if cfg.get(key) != self.run_config[key]:
                raise FactEditError(f"--pre-from {src}: it was run with another {key} "
                                    f"({cfg.get(key)!r}, this run: {self.run_config[key]!r})")
        if cfg.get("eval", {}).get("batch_size") is None:
            raise FactEditError(f"--pre-from {src}: run.json has no eval settings")
        theirs = cfg["eval"]
        for key in ("protocol", "template", "max_new_tokens"):  # the generation protocol's records differ
            if self.cfg.protocol == "generation" or theirs.get("protocol", "bench") != "bench":
                mine = dataclasses.asdict(self.cfg)[key]
                if theirs.get(key, dataclasses.asdict(EvalConfig())[key]) != mine:
                    raise FactEditError(f"--pre-from {src}: it was scored with eval.{key} = {theirs.get(key)!r}, "
                                        f"this run with {mine!r}")
        got = {}
        for r in read_jsonl(src / "pre.jsonl"):
            i = r.get("index")
            if not isinstance(i, int) or not 0 <= i < len(self.cases) or r.get("case_id") != self.cases[i].case_id:
                continue
            if "request" in r:
                if r["request"] != self.cases[i].request.to_dict():
                    continue
            elif self.bench != "counterfact":  # zsRE requests also depend on the chosen target
                continue
            got[i] = r["pre"]
        log.info("pre-edit records reused from %s: %d of %d", src, len(got), len(self.cases))
        return got

    def _pre(self) -> dict[int, dict]:
        done = {r["index"]: r["pre"] for r in read_jsonl(self.out / "pre.jsonl")}
        if self.pre_from is not None:
            reuse = {i: p for i, p in self._reused_pre().items() if i not in done}
            if reuse:
                with JsonlWriter(self.out / "pre.jsonl") as w:
                    for i in sorted(reuse):
                        w.write({"index": i, "case_id": self.cases[i].case_id,
                                 "request": self.cases[i].request.to_dict(), "pre": reuse[i]})
                done.update(reuse)
        todo = [i for i in range(len(self.cases)) if i not in done]
        chunk = 64
        with JsonlWriter(self.out / "pre.jsonl") as w:
            for s in tqdm(range(0, len(todo), chunk), desc="pre-edit eval", disable=None if todo else True):
                t0 = time.perf_counter()
                idx = todo[s : s + chunk]
                for i, rec in zip(idx, self._score(idx, desc=None)):
                    done[i] = rec
                    w.write({"index": i, "case_id": self.cases[i].case_id,
                             "request": self.cases[i].request.to_dict(), "pre": rec})
                _add_time(self.out, "eval_s", time.perf_counter() - t0)
        return done

    def _general(self, phase: str) -> dict[str, Any]:
        path = self.out / "general.json"
        gen = json.loads(path.read_text()) if path.exists() else {}
        if phase in gen:
            return gen[phase]
        t0 = time.perf_counter()
        res: dict[str, Any] = {}
        if self.general_text and self.cfg.ppl_tokens > 0:
            res["perplexity"] = round(perplexity(self.lm, self.general_text, self.cfg.ppl_tokens, self.cfg.ppl_window), 4)
        prompts = [p for c in self.cases[: self.cfg.fluency_cases] for p in c.generation_prompts]
        if prompts:
            texts = sample_batch(self.lm, prompts, self.cfg.gen_length, self.cfg.gen_top_k,
                                 seeds=[self.cfg.seed + k for k in range(len(prompts))])
            res["fluency"] = round(100 * mean(ngram_entropy(t) for t in texts), 2)
            res["samples"] = texts[:3]
        gen[phase] = res
        write_json(path, gen)
        _add_time(self.out, "eval_s", time.perf_counter() - t0)
        return res

    def _post_records(self, idx: list[int], pre: dict[int, dict], writer: JsonlWriter, extra: dict | None = None) -> None:
        chunk = 64
        for s in range(0, len(idx), chunk):
            t0 = time.perf_counter()
            part = idx[s : s + chunk]
            for i, rec in zip(part, self._score(part, desc=None)):
                rec.update(case_metrics(rec["raw"], self.bench, pre=pre[i], protocol=self.cfg.protocol))
                c = self.cases[i]
                writer.write({"index": i, "case_id": c.case_id, "request": c.request.to_dict(), "pre": pre[i],
                              "post": rec, **(extra or {})})
            _add_time(self.out, "eval_s", time.perf_counter() - t0)

    def _compute_saved(self, path: Path, requests) -> Patch:
        """The patch at ``path`` if a previous run saved it, else compute (timed) and save it."""
        if (path / "manifest.json").exists():
            return load_patch(path)
        t0 = time.perf_counter()
        patch = self.editor.compute(self.lm, requests)
        patch.meta["edit_s"] = time.perf_counter() - t0
        patch.save(path)
        _add_time(self.out, "edit_s", patch.meta["edit_s"])
        return patch

    def _stream(self) -> EditStream:
        """The sequential stream of this run folder (its editor state), restored into the editor; its committed
        rounds must be the saved rounds/ patches, in order."""
        stream = EditStream(self.out / "editor_state", self.editor.name, what="editor state")
        rec = stream.record
        if rec is not None and "chain" not in rec:  # folders written before the stream protocol: rounds 0..round
            rec["chain"] = [patch_digest(self.out / f"rounds/{r:04d}") for r in range(int(rec.get("round", -1)) + 1)]
            rec["base_fingerprint"] = self.lm.fingerprint
        n = stream.restore(self.lm, self.editor)
        stream.check_rounds([patch_digest(self.out / f"rounds/{r:04d}") for r in range(n)], source="rounds/")
        if n:
            log.info("sequential: editor state restored after %d round(s)", n)
        return stream

    def run(self) -> dict:
        self._open_folder()
        pre = self._pre()
        general = {"pre": self._general("pre")} if self.mode != "single" or self.pre_only else {}
        if self.pre_only:  # baseline figures of the unedited model: no edits at all
            return self._summarise(general, [{"index": i, "pre": r, "post": {}} for i, r in sorted(pre.items())])
        done = {r["index"] for r in read_jsonl(self.out / "cases.jsonl")}
        after = self.cfg.after_round  # check_mode: only in sequential mode
        after_done = {r["index"] for r in read_jsonl(self.out / "after_round.jsonl")} if after else set()
        handles = []
        try:
            with JsonlWriter(self.out / "cases.jsonl") as w, \
                    (JsonlWriter(self.out / "after_round.jsonl") if after else contextlib.nullcontext()) as aw:
                if self.mode == "single":
                    todo = [i for i in range(len(self.cases)) if i not in done]
                    for i in tqdm(todo, desc="single edits", disable=None):
                        t0 = time.perf_counter()
                        patch = self.editor.compute(self.lm, list(self.cases[i].requests))
                        dt = time.perf_counter() - t0
                        _add_time(self.out, "edit_s", dt)
                        with patch.apply(self.lm):
                            self._post_records([i], pre, w, extra={"edit_s": round(dt, 3)})
                elif self.mode == "batch" and self.edit_batch is not None and self.edit_batch < len(self.cases):
                    # calls of --batch-size facts, each on the unedited model and reverted after its facts are
                    # scored (how batch editing is measured at m facts per call); no general post-edit figures
                    k = self.edit_batch
                    calls = _chunks(len(self.cases), k)
                    for r, idx in enumerate(tqdm(calls, desc=f"calls of {k}", disable=None)):
                        if left := [i for i in idx if i not in done]:
                            patch = self._compute_saved(self.out / f"calls/{r:04d}",
                                                        [q for i in idx for q in self.cases[i].requests])
                            with patch.apply(self.lm):
                                self._post_records(left, pre, w, extra={"call": r})
                    log.info("batch: %d calls of %d facts; perplexity and fluency after an edit are not measured "
                             "(each call is reverted)", len(calls), k)
                else:
                    k = len(self.cases) if self.mode == "batch" else self.edit_batch
                    rounds = _chunks(len(self.cases), k)
                    seq = self.mode == "sequential"
                    stream = self._stream() if seq else None
                    for r, idx in enumerate(tqdm(rounds, desc=f"{self.mode} edits", disable=None)):
                        path = self.out / ("patch" if not seq else f"rounds/{r:04d}")
                        # a saved round is read back (committed, or the unfinished round, committed as saved)
                        patch = self._compute_saved(path, [q for i in idx for q in self.cases[i].requests])
                        handles.append(patch.apply(self.lm))
                        if stream is not None and r >= stream.n_rounds:
                            stream.commit(patch, path, self.lm, round=r)
                        if after and (left := [i for i in idx if i not in after_done]):
                            self._post_records(left, pre, aw, extra={"round": r})
                    todo = [i for i in range(len(self.cases)) if i not in done]
                    for s in tqdm(range(0, len(todo), 64), desc="post-edit eval", disable=None if todo else True):
                        self._post_records(todo[s : s + 64], pre, w)
                    general["post"] = self._general("post")
        finally:
            for h in reversed(handles):
                h.revert()
        return self._summarise(general)

    def _summarise(self, general: dict, recs: list[dict] | None = None) -> dict:
        if recs is None:
            recs = sorted(read_jsonl(self.out / "cases.jsonl"), key=lambda r: r["index"])
        pre_m = aggregate([r["pre"] for r in recs])
        post_m = aggregate([{k: v for k, v in r["post"].items() if k != "raw"} for r in recs])
        for phase in ("pre", "post"):
            target = pre_m if phase == "pre" else post_m
            for k, v in general.get(phase, {}).items():
                if k != "samples":
                    target[k] = v
        by_round = self._by_round(recs) if self.cfg.after_round and not self.pre_only else None
        t = _timing(self.out)
        summary = {
            "method": "none" if self.pre_only else self.editor.name, "model": self.lm.name, "bench": self.bench, "mode": self.mode,
            "n_cases": len(recs), "edit_batch": self.run_config["edit_batch"], "pre": pre_m, "post": post_m,
            "timing": {"edit_s": round(t["edit_s"], 2), "eval_s": round(t["eval_s"], 2),
                       "edit_s_per_fact": round(t["edit_s"] / max(1, len(recs)), 3)},
            **(by_round or {}),
            "method_config": self.editor.config_dict(), "preset": self.editor.preset,
            "fluency_samples": {p: general.get(p, {}).get("samples", []) for p in ("pre", "post")},
        }
        write_json(self.out / "summary.json", summary)
        return summary

    def _by_round(self, recs: list[dict]) -> dict:
        """``after_round``: each round's records right after the round, overall and per round, with the same
        records at the end of the stream beside them (the retention of that round's edits)."""
        after = {r["index"]: r for r in read_jsonl(self.out / "after_round.jsonl")}
        missing = [r["index"] for r in recs if r["index"] not in after]
        if missing:
            raise FactEditError(f"{self.out / 'after_round.jsonl'}: no record for case index {missing[0]} "
                                f"({len(missing)} missing); remove the run folder and run again")

        def post(r: dict) -> dict:
            return {k: v for k, v in r["post"].items() if k != "raw"}

        rounds = sorted({after[r["index"]]["round"] for r in recs})
        per = []
        for k in rounds:
            rs = [r for r in recs if after[r["index"]]["round"] == k]
            a, e = aggregate([post(after[r["index"]]) for r in rs]), aggregate([post(r) for r in rs])
            per.append({"round": k, "n": len(rs), "after_round": {m: a[m] for m in HEADLINE if m in a},
                        "at_end": {m: e[m] for m in HEADLINE if m in e}})
        return {"after_round": aggregate([post(after[r["index"]]) for r in recs]), "by_round": per}


def check_mode(cfg: EvalConfig, mode: str) -> None:
    """Evaluation settings that only make sense in some modes."""
    if cfg.after_round and mode != "sequential":
        raise FactEditError(f"eval.after_round scores each round of a sequential run; mode '{mode}' has no rounds "
                            "(use --mode sequential, or leave after_round off)")


def eval_config(overrides: dict | None) -> EvalConfig:
    return cfgmod.build(EvalConfig, overrides, what="eval")
