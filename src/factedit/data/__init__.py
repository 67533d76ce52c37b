"""Benchmark and user-fact loaders. Each returns validated `EvalCase`s or `EditRequest`s."""

from .counterfact import load_counterfact
from .facts import load_facts
from .paths import default_bench_file, default_data_dir
from .zsre import load_zsre

__all__ = ["load_counterfact", "load_zsre", "load_facts", "default_data_dir", "default_bench_file"]
