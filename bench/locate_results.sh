#!/usr/bin/env bash
# Issue 3 figures on SmolLM2-135M (run from the repo root after `make install`; one job at a time on a
# 2-core CPU: concurrent jobs slow each other down far more than 2x). Every step resumes where it
# stopped: re-run the script after an interruption.
set -euo pipefail
F=".venv/bin/factedit"; [ -x "$F" ] || F=factedit
PY=".venv/bin/python"; [ -x "$PY" ] || PY=python
OUT=${OUT:-runs}
N=${N:-1000}
EV="--set eval.fluency_cases=10"
# On a CUDA GPU (session 12, one H100: `DEVICE=cuda bash bench/locate_results.sh` runs only this part):
# the preset runs again at 1,000 edits (to compare with the CPU's), NSE at the published clamp 0.75, and
# the papers' protocol, 2,000 sequential edits in rounds of 100, for MEMIT, AlphaEdit and NSE.
if [ "${DEVICE:-cpu}" != cpu ]; then
  G="$F --device $DEVICE -q eval --bench counterfact --mode sequential --batch-size 100 $EV --set z_batch=100"
  $G --method alphaedit --limit 1000 --out $OUT/gpu-ae1000
  $G --method memit --limit 1000 --out $OUT/gpu-memit1000 --pre-from $OUT/gpu-ae1000
  $G --method nse --limit 1000 --out $OUT/gpu-nse1000-c075-l5000 --pre-from $OUT/gpu-ae1000 --set clamp_norm_factor=0.75
  $G --method nse --limit 1000 --out $OUT/gpu-nse1000-c075-l10000 --pre-from $OUT/gpu-ae1000 \
     --set clamp_norm_factor=0.75 --set mom2_update_weight=10000
  for m in memit alphaedit nse; do $G --method $m --limit 2000 --out $OUT/gpu-$m-seq2000; done
  $PY bench/compare_runs.py $OUT/gpu-ae1000 $OUT/gpu-memit1000 $OUT/gpu-nse1000-c075-l5000 \
      $OUT/gpu-nse1000-c075-l10000 --metrics efficacy,specificity --out bench/results/compare-gpu-seq1000.json
  $PY bench/compare_runs.py $OUT/gpu-nse-seq2000 $OUT/gpu-alphaedit-seq2000 $OUT/gpu-memit-seq2000 \
      --metrics efficacy,specificity --out bench/results/compare-gpu-seq2000.json
  exit 0
fi
$F -q stats --layers 1-8 --tokens 200000 --nullspace 0.02 --nullspace-mode absolute
$F -q stats --model gemma3-270m --layers 1-7 --tokens 200000 --nullspace 0.02 --nullspace-mode absolute
$F -q trace --model smollm2-135m --answer known --limit 30 --samples 5 --window 6 --out bench/results/trace-smollm2-135m.json
$F -q trace --model gemma3-270m --answer known --limit 30 --samples 5 --window 4 --out bench/results/trace-gemma3-270m.json
$PY bench/zstar_speed.py --n 4 --batch 4 --paths straightforward,optimised --out bench/results/zstar_speed.json
$PY bench/zstar_speed.py --n 8 --batch 8 --out bench/results/zstar_speed-amx.json
$PY bench/eval_speed.py --n 256 --repeats 2 --out bench/results/eval_speed.json
$PY bench/zstar_batch.py 100,32,100,32 100 200 bench/results/zstar_batch.json
# bf16 autocast against fp32, alternating (session 11 ran these on a CPU with AMX: *-amx.json)
$PY bench/zstar_batch.py 100,100bf16,100,100bf16 100 200 bench/results/zstar_bf16-amx.json
# the 60-minute target, timed from scratch: no z* store, the pre-edit records computed in the run
mkdir -p $OUT/empty-zstar
FACTEDIT_ZSTAR_CACHE=$OUT/empty-zstar $F -q eval --method alphaedit --bench counterfact --limit $N --mode sequential \
   --batch-size 100 --out $OUT/alphaedit-seq$N-scratch $EV --set z_batch=100
# the unedited model's records, computed once and shared by every run below (--pre-from)
$F -q eval --method memit --bench counterfact --limit $N --pre-only --out $OUT/pre-cf$N $EV
$F -q eval --method memit --bench zsre --limit 100 --pre-only --out $OUT/pre-zsre100 $EV
# sequential, rounds of 100, evaluated once at the end on all edited facts
for m in alphaedit nse memit; do
  $F -q eval --method $m --bench counterfact --limit $N --mode sequential --batch-size 100 --out $OUT/$m-seq$N \
     --pre-from $OUT/pre-cf$N $EV --set z_batch=100
done
# batch, 100 facts at once
for m in rome memit; do
  $F -q eval --method $m --bench counterfact --limit 100 --mode batch --out $OUT/$m-cf100 --pre-from $OUT/pre-cf$N $EV
done
# zsRE token accuracy, 100 facts in one batch
for m in rome memit alphaedit nse; do
  $F -q eval --method $m --bench zsre --limit 100 --mode batch --out $OUT/$m-zsre100 --pre-from $OUT/pre-zsre100 $EV
done
# paired comparison of the sequential runs (McNemar on per-case specificity)
$PY bench/compare_runs.py $OUT/alphaedit-seq$N $OUT/nse-seq$N $OUT/memit-seq$N --out bench/results/compare-seq$N.json
# why NSE's efficacy stops near 91: per-round distances to z*, and efficacy with h_L set to z* (session 11)
$PY bench/nse_distance.py $OUT/nse-seq$N $((N - 100)) $N --out bench/results/nse-distance-seq$N.json
$PY bench/nse_oracle.py --n $N --rounds-of 100 --out bench/results/nse-oracle-seq$N.json
# session 13: one NSE round alone, and each round's efficacy right after it and at the end of the stream
$PY bench/solve_sweep.py nse '{"mom2_update_weight":[5000,1500,300]}' --n 100 --ppl-tokens 8192 --z-batch 100 \
    --out bench/results/solve_sweep.jsonl
$PY bench/solve_sweep.py nse '{"mom2_update_weight":[1500,5000]}' --n $N --rounds-of 100 --score-every 2 \
    --ppl-tokens 16384 --z-batch 100 --by-round --out bench/results/solve_sweep.jsonl
# More samples of 1,000 CounterFact-edit records, written to a file outside the repository and passed with --data.
# cf_slice FROM TO FILE: records FROM..TO-1 of the shared file. seq1000 METHOD DATA OUT [ARGS]: 1,000 sequential
# edits in rounds of 100, evaluated at the end (ARGS: --pre-from, more --set).
cf_slice() {
  $PY -c "import gzip,json,sys; json.dump(json.load(gzip.open(sys.argv[1],'rt'))[int(sys.argv[2]):int(sys.argv[3])],open(sys.argv[4],'w'))" \
      "${FACTEDIT_DATA:-../shared/data}/counterfact/counterfact-edit.json.gz" "$1" "$2" "$3"
}
seq1000() {
  local method=$1 data=$2 out=$3; shift 3
  $F -q eval --method "$method" --bench counterfact --data "$data" --mode sequential --batch-size 100 --out "$out" \
     $EV --set z_batch=100 "$@"
}
CMP="--metrics efficacy,specificity,specificity_magnitude"
# rundir METHOD: the run folders' name for a method (ae for alphaedit)
rundir() { [ "$1" = alphaedit ] && echo ae || echo "$1"; }
# sample TAG FROM TO FIRST SECOND THIRD: records FROM..TO-1, the three methods in this order (the first records the
# unedited model's figures, the others reuse them), then their paired comparison
sample() {
  local tag=$1 data=$OUT/cf-$2-$(($3 - 1)).json first=$4
  cf_slice "$2" "$3" "$data"
  seq1000 "$first" "$data" "$OUT/$(rundir "$first")-seq1000-$tag"
  for m in "$5" "$6"; do
    seq1000 "$m" "$data" "$OUT/$(rundir "$m")-seq1000-$tag" --pre-from "$OUT/$(rundir "$first")-seq1000-$tag"
  done
  $PY bench/compare_runs.py $OUT/nse-seq1000-$tag $OUT/ae-seq1000-$tag $OUT/memit-seq1000-$tag $CMP \
      --out bench/results/compare-seq1000-$tag.json
}
# session 13: AlphaEdit against sequential MEMIT on a second sample, records 1000-1999
sample b 1000 2000 alphaedit memit nse
# session 14: a third sample, records 2000-2999 (NSE first: it records the unedited model's figures)
sample c 2000 3000 nse memit alphaedit
# the second and third samples pooled (comma-joined run folders; the first sample's runs are summarised in
# bench/results/compare-seq1000.json, whose counts add to these)
$PY bench/compare_runs.py $OUT/nse-seq1000-b,$OUT/nse-seq1000-c $OUT/ae-seq1000-b,$OUT/ae-seq1000-c \
    $OUT/memit-seq1000-b,$OUT/memit-seq1000-c $CMP --out bench/results/compare-seq1000-bc.json
# session 14: each round's efficacy right after it and at the end (eval.after_round), the second sample again; the
# z* of these sequential runs are read from the z* store (the runs reproduce their weights bit for bit)
for m in memit alphaedit nse; do
  seq1000 $m $OUT/cf-1000-1999.json $OUT/$(rundir $m)-seq1000-b-ar --pre-from $OUT/ae-seq1000-b --set eval.after_round=true
done
# session 14: NSE's α (the distance above which a request is re-edited) at 5 and 20 around the preset's 10 (z* from the store)
for a in 5 20; do
  seq1000 nse $OUT/cf-1000-1999.json $OUT/nse-seq1000-b-ar-alpha$a --pre-from $OUT/ae-seq1000-b \
      --set eval.after_round=true --set alpha=$a
done
# session 15: the second family, Gemma 3 270M (pip install "factedit[gemma]"; statistics: factedit stats --model
# gemma3-270m --layers 1-7 --tokens 200000 --nullspace 0.02 --nullspace-mode absolute), 500 sequential edits in
# rounds of 100 on the first 500 CounterFact-edit records, presets unchanged, z* in bf16 (AMX CPU)
GM="--model gemma3-270m"
GSEQ="--bench counterfact --limit 500 --mode sequential --batch-size 100 --set eval.after_round=true --set autocast=bf16 --set z_batch=100"
$F -q eval $GM --method memit $GSEQ --out $OUT/gemma-memit-seq500
for m in alphaedit nse; do
  $F -q eval $GM --method $m $GSEQ --out $OUT/gemma-$(rundir $m)-seq500 --pre-from $OUT/gemma-memit-seq500
done
$PY bench/compare_runs.py $OUT/gemma-nse-seq500 $OUT/gemma-ae-seq500 $OUT/gemma-memit-seq500 $CMP \
    --out bench/results/compare-gemma-seq500.json
# session 15: NSE's λ on Gemma around the preset's 1500 (z* from the store: NSE's come from the original weights)
for l in 5000 500; do
  $F -q eval $GM --method nse $GSEQ --out $OUT/gemma-nse-seq500-l$l --pre-from $OUT/gemma-memit-seq500 \
      --set mom2_update_weight=$l
done
# session 15: plain MEMIT on Gemma (no accumulated K Kᵀ), the other reading of the papers' sequential baseline
$F -q eval $GM --method memit $GSEQ --out $OUT/gemma-memit-noacc-seq500 --pre-from $OUT/gemma-memit-seq500 --set accumulate=false
$PY bench/compare_runs.py $OUT/gemma-nse-seq500 $OUT/gemma-ae-seq500 $OUT/gemma-memit-noacc-seq500 $CMP \
    --out bench/results/compare-gemma-seq500-noacc.json
# session 16: the same three on Gemma at 1,000 sequential edits (the issue's protocol; rounds 1-5 read their z* from
# the store, as the weights after each of the 500-edit runs' rounds are the same bit for bit)
GSEQ1K="${GSEQ/--limit 500/--limit 1000}"
$F -q eval $GM --method memit $GSEQ1K --out $OUT/gemma-memit-seq1000 --pre-from $OUT/gemma-memit-seq500
for m in nse alphaedit; do
  $F -q eval $GM --method $m $GSEQ1K --out $OUT/gemma-$(rundir $m)-seq1000 --pre-from $OUT/gemma-memit-seq1000
done
$PY bench/compare_runs.py $OUT/gemma-nse-seq1000 $OUT/gemma-ae-seq1000 $OUT/gemma-memit-seq1000 $CMP \
    --out bench/results/compare-gemma-seq1000.json
