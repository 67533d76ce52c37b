#!/usr/bin/env bash
# Reproduces the figures in docs/results.md for issue 2; bench/locate_results.sh does issue 3.
# Run from the repo root after `make install`.
set -euo pipefail
F=".venv/bin/factedit"; [ -x "$F" ] || F=factedit
OUT=${OUT:-runs}
$F -q eval --method ft --bench counterfact --limit 500 --pre-only --out $OUT/pre-cf500
$F -q eval --method ft --bench zsre --pre-only --out $OUT/pre-zsre
$F -q eval --method ft --bench counterfact --limit 100 --mode batch --out $OUT/ft-cf100 --set eval.fluency_cases=10
$F -q eval --method loreft --bench counterfact --limit 100 --mode batch --out $OUT/loreft-cf100 --set eval.fluency_cases=10
