#!/usr/bin/env bash
# The learned-queries issue's grids (rerun to resume). RULER 2k on the estimator grid's samples (the first 5 per task,
# the same prompts as docs/results/estimators.md), budgets 64/128/256: the shipped learned queries alone, then the
# one-shot and lookahead baselines at 64 and 256 (budget 128: the estimator grid's rows). SAMPLES=10 extends both.
cd "$(dirname "$0")/.."  # the repository root
S=${SAMPLES:-5}
Q=${QUERIES:-}  # a queries file to evaluate instead of the shipped one (its own run folder)
if [ -n "$Q" ]; then
  dapq eval ruler --tasks all --lengths 2048 --samples "$S" --methods learned --param "learned.queries=$Q" \
    --budgets 64,128,256 --out "runs/front-ruler-$(basename "$Q" .pt)"
  exit
fi
dapq eval ruler --tasks all --lengths 2048 --samples "$S" --methods learned --budgets 64,128,256 --out runs/front-ruler-learned
dapq eval ruler --tasks all --lengths 2048 --samples "$S" --methods full,snapkv,dapq,laq --budgets 64,256 \
  --out runs/front-ruler-base
