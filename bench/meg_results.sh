#!/usr/bin/env bash
# Issue 24 figures on SmolLM2-135M: MeG trained on the first N counterfact-edit facts and evaluated on them under
# the generation protocol, beside MEMIT and AlphaEdit (all N facts in one call) on the same facts and protocol, with
# paired tests; the ablations (no familiarity gate; the MLP generator); the added cost per query. Run from the repo
# root after `make install`, one job at a time; every step resumes where it stopped (re-run the script).
#   N=128 bash bench/meg_results.sh          # the quick configuration
#   N=1000 bash bench/meg_results.sh         # the (a multi-hour CPU job)
set -euo pipefail
F=".venv/bin/factedit"; [ -x "$F" ] || F=factedit
PY=".venv/bin/python"; [ -x "$PY" ] || PY=python
N=${N:-128}
OUT=${OUT:-runs/meg}
STEPS=${STEPS:-train eval baselines ablations cost}
D=${DATA:-../shared/data}/counterfact/counterfact-edit.json.gz
EV="--bench counterfact --data $D --limit $N --mode batch --protocol generation --set eval.ppl_tokens=0 --set eval.fluency_cases=0"
for step in $STEPS; do case $step in
train)
  [ -f $OUT/meg-$N/editor.json ] || $F train --method meg --data $D --limit $N --out $OUT/meg-$N ;;
eval)
  $F eval --method meg --editor $OUT/meg-$N $EV --out $OUT/eval-meg-$N ;;
baselines)
  for m in ${BASELINES:-memit alphaedit}; do
    $F eval --method $m $EV --out $OUT/eval-$m-$N --pre-from $OUT/eval-meg-$N
  done
  $PY bench/compare_runs.py $OUT/eval-meg-$N $(for m in ${BASELINES:-memit alphaedit}; do echo $OUT/eval-$m-$N; done) \
      --metrics efficacy,generalization,locality --out bench/results/meg-cf$N.json ;;
ablations)
  $F eval --method meg --editor $OUT/meg-$N --set gate=false $EV --out $OUT/eval-meg-nogate-$N --pre-from $OUT/eval-meg-$N
  [ -f $OUT/meg-mlp-$N/editor.json ] || $F train --method meg --data $D --limit $N --set generator=mlp --out $OUT/meg-mlp-$N
  $F eval --method meg --editor $OUT/meg-mlp-$N $EV --out $OUT/eval-meg-mlp-$N --pre-from $OUT/eval-meg-$N
  $PY bench/compare_runs.py $OUT/eval-meg-$N $OUT/eval-meg-nogate-$N $OUT/eval-meg-mlp-$N \
      --metrics efficacy,generalization,locality --out bench/results/meg-ablations-cf$N.json ;;
cost)
  $PY bench/meg_cost.py --editor $OUT/meg-$N --data $D --n 64 --out bench/results/meg_cost.json ;;
esac; done
