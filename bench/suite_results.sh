#!/usr/bin/env bash
# Every published figure of the suite, from the completed table build to the shipped policy, in
# order: export the table, the tables' findings, tune the search policy's training length on the
# training tasks alone, the transfer benchmark (10 seeds), then ship the policy. Each step resumes
# where it stopped (finished folds are kept in $MEMRL_CACHE/benchmark; the cache key includes the
# code and the table, so a change reruns what it touches). Run it when
# `python -m memrl.tables build` has finished (it stops otherwise), with nothing else running:
#
#     bash bench/suite_results.sh 2>&1 | tee suite_results.log
#
# PARTS=DIR keeps the finished folds in DIR/<command> instead (a folder that outlives the machine,
# for a run that spans sessions).
# Then copy the new numbers into README.md (its front-page table is the headline table that opens
# transfer.md), bench/README.md and configs/bench.yaml's comments.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=bench/results/benchmark
export OMP_NUM_THREADS=1  # single-threaded workers side by side (bench/README.md)
parts() { if [[ -n "${PARTS:-}" ]]; then echo "--parts $PARTS/$1"; fi; }

status=$($PY -m memrl.tables status | tail -n 1)
read -r stored total <<<"$(sed -E 's#^ *all +([0-9]+)/([0-9]+).*#\1 \2#' <<<"$status")"
if [[ "$stored" != "$total" ]]; then
  echo "the suite is not complete ($status): run python -m memrl.tables build first" >&2
  exit 1
fi
$PY -m memrl.tables export
$PY -m pytest -q tests/test_tables.py -k shipped

$PY -m research.benchmark findings --out "$OUT"
$PY -m research.benchmark tune --method ppo-search --n-seeds 2 --out "$OUT" $(parts tune)

# tune's choice must be what configs/bench.yaml trains: the shipped policy and the transfer
# benchmark's search policy both take their length from ppo.total_timesteps (episodes x budget)
chosen=$(sed -nE 's/^Chosen: learning rate ([0-9.e-]+), length ([0-9]+)\.$/\1 \2/p' "$OUT/tune-ppo-search.md")
read -r rate episodes <<<"$chosen"
read -r have_rate have_steps budget <<<"$($PY -c '
from memrl.config import load_config
c = load_config("bench")
print(c.ppo.learning_rate, c.ppo.total_timesteps, c.env.budget)')"
if [[ $((episodes * budget)) != "$have_steps" ]] || ! $PY -c "import sys; sys.exit(abs($rate - $have_rate) > 1e-12)"; then
  echo "tune chose learning rate $rate and $episodes episodes; configs/bench.yaml has $have_rate and" \
    "$have_steps steps: set ppo.learning_rate: $rate and ppo.total_timesteps: $((episodes * budget))," \
    "then rerun this script (what is done is kept)" >&2
  exit 1
fi

$PY -m research.benchmark transfer --n-seeds 10 --out "$OUT" $(parts transfer)
$PY -m research.benchmark ship --out "$OUT"
