#!/usr/bin/env bash
# Reproduces the main figures in docs/results.md. Run from the repo root after `make install`.
#   bash bench/results.sh            issue 2: pre-edit records, FT-L and LoReFT (about 30 min on 2 cores)
#   bash bench/results.sh issue3     issue 3: traces, statistics, batch and 1,000-edit sequential runs
#                                    (many hours on 2 cores; every run resumes if interrupted)
# Sweeps and diagnostics have their own commands next to their tables in docs/results.md.
set -euo pipefail
F=".venv/bin/factedit"; [ -x "$F" ] || F=factedit
OUT=${OUT:-runs}
what=${1:-issue2}

if [ "$what" = issue2 ]; then
  $F -q eval --method ft --bench counterfact --limit 500 --pre-only --out $OUT/pre-cf500
  $F -q eval --method ft --bench zsre --pre-only --out $OUT/pre-zsre
  $F -q eval --method ft --bench counterfact --limit 100 --mode batch --out $OUT/ft-cf100 --set eval.fluency_cases=10
  $F -q eval --method loreft --bench counterfact --limit 100 --mode batch --out $OUT/loreft-cf100 --set eval.fluency_cases=10
elif [ "$what" = issue3 ]; then
  # layer choice and key statistics
  $F -q trace --model smollm2-135m --answer known --limit 30 --samples 5 --window 6 --out $OUT/trace-smollm2-135m.json
  $F -q trace --model gemma3-270m --answer known --limit 30 --samples 5 --window 4 --out $OUT/trace-gemma3-270m.json
  $F -q stats --layers 1-8 --tokens 200000 --nullspace 0.02 --nullspace-mode absolute
  # 1,000 sequential edits, rounds of 100, evaluated once at the end (the first run also writes the pre-edit records)
  seq="--bench counterfact --limit 1000 --mode sequential --batch-size 100 --set eval.fluency_cases=10 --set z_batch=32"
  $F -q eval --method alphaedit $seq --out $OUT/alphaedit-seq1000
  $F -q eval --method nse $seq --out $OUT/nse-seq1000 --pre-from $OUT/alphaedit-seq1000
  $F -q eval --method memit $seq --out $OUT/memit-seq1000 --pre-from $OUT/alphaedit-seq1000
  # 100 facts in one batch: CounterFact and zsRE
  for m in memit rome; do
    $F -q eval --method $m --bench counterfact --limit 100 --mode batch --out $OUT/$m-cf100 \
      --pre-from $OUT/alphaedit-seq1000 --set eval.fluency_cases=10
  done
  $F -q eval --method memit --bench zsre --limit 100 --mode batch --out $OUT/memit-zsre100 --set eval.fluency_cases=10
  for m in alphaedit nse rome; do
    $F -q eval --method $m --bench zsre --limit 100 --mode batch --out $OUT/$m-zsre100 \
      --pre-from $OUT/memit-zsre100 --set eval.fluency_cases=10
  done
else
  echo "usage: bash bench/results.sh [issue2|issue3]" >&2; exit 2
fi
