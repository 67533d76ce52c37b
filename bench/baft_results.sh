#!/usr/bin/env bash
# Issue 23 figures on SmolLM2-135M: BaFT against LoReFT at the same rank, layer and position (their presets), and
# the baselines beside them, on the same cases. Run from the repo root after `make install`, one job at a time;
# every step resumes where it stopped (re-run the script). STEPS picks parts: single, batch, continual, mech.
set -euo pipefail
F=".venv/bin/factedit"; [ -x "$F" ] || F=factedit
PY=".venv/bin/python"; [ -x "$PY" ] || PY=python
OUT=${OUT:-runs/baft}
STEPS=${STEPS:-single batch continual mech}
N_SINGLE=${N_SINGLE:-200}              # session 22 ran N_SINGLE=100 N_CONT=200 (CPU time)
N_CONT=${N_CONT:-1000}
ZS="--bench knowedit-zsre"                    # KnowEdit ZsRE test; unrelated prompts from the zsRE train split
ZS_LOC="--set loc_data=zsre/zsre_mend_train-1k.json"
WC="--bench knowedit-wiki_counterfact"        # only its train split exists here: edit the first N, unrelated
WC_LOC="--set loc_data=knowedit/wiki_counterfact/train_cf.json.gz --set loc_from=1000"  # prompts from 1000 on
EV="--set eval.ppl_tokens=0 --set eval.fluency_cases=0"
cmp() { $PY bench/compare_runs.py "$@"; }
for step in $STEPS; do case $step in
single)
  for b in zs wc; do
    if [ $b = zs ]; then B=$ZS; L=$ZS_LOC; else B=$WC; L=$WC_LOC; fi
    $F -q eval --method loreft $B --limit $N_SINGLE --mode single $EV --out $OUT/single-$b-loreft
    $F -q eval --method baft $B --limit $N_SINGLE --mode single $EV $L --out $OUT/single-$b-baft \
       --pre-from $OUT/single-$b-loreft
    for m in ${BASELINES:-}; do
      $F -q eval --method $m $B --limit $N_SINGLE --mode single $EV --out $OUT/single-$b-$m --pre-from $OUT/single-$b-loreft
    done
    M=efficacy,locality,portability; [ $b = zs ] && M=efficacy,generalization,locality,portability
    cmp $OUT/single-$b-baft $OUT/single-$b-loreft --metrics $M --out bench/results/baft-single-$b.json
  done ;;
batch)
  $F -q eval --method loreft $ZS --limit 100 --mode batch $EV --out $OUT/batch-zs-loreft
  $F -q eval --method baft $ZS --limit 100 --mode batch $EV $ZS_LOC --out $OUT/batch-zs-baft --pre-from $OUT/batch-zs-loreft
  for m in ${BASELINES:-}; do
    $F -q eval --method $m $ZS --limit 100 --mode batch $EV --out $OUT/batch-zs-$m --pre-from $OUT/batch-zs-loreft
  done
  cmp $OUT/batch-zs-baft $OUT/batch-zs-loreft --metrics efficacy,generalization,locality,portability \
      --out bench/results/baft-batch-zs.json ;;
continual)
  C="--bench counterfact --limit $N_CONT --mode sequential --batch-size 50 --set continual=true $EV"
  $F -q eval --method loreft $C --out $OUT/cont-cf-loreft
  $F -q eval --method baft $C --out $OUT/cont-cf-baft --pre-from $OUT/cont-cf-loreft
  cmp $OUT/cont-cf-baft $OUT/cont-cf-loreft --metrics efficacy,generalization,specificity \
      --out bench/results/baft-continual-cf.json ;;
mech)
  $PY bench/baft_mechanism.py --n 50 --runs $OUT/mech ;;
esac; done
