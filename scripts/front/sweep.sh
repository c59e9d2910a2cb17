#!/usr/bin/env bash
# The RULER and NIAH grids of docs/results/front.md: `learned` beside FullKV, SnapKV, DapQ and LAQ (rerun to resume).
# PART=grid (the default) LENGTH=2048|4096 SAMPLES=10: RULER on the estimator grid's samples (the same prompts as
# docs/results/estimators.md) in one folder per length, runs/front-ruler-<L>: FullKV, SnapKV, DapQ, LAQ and the
# shipped `learned` at 64/128/256 (budget 128 of the baselines: the estimator grid's rows).
# To resume a committed grid, put its rows in the folder first (rows of methods not asked for are kept and ignored):
#   mkdir -p runs/front-ruler-2048 && zcat docs/results/front/ruler-2k.jsonl.gz > runs/front-ruler-2048/results.jsonl
# A new length starts from the estimator grid's rows (docs/results/estimators/ruler-4k.jsonl.gz for 4096).
# PART=niah: the estimator grid's NIAH with `learned` added. QUERIES=file.pt: a trained queries file instead of the
# shipped one, `learned` alone at 2k (its own run folder).
cd "$(dirname "$0")/../.."  # the repository root
S=${SAMPLES:-5}
Q=${QUERIES:-}
if [ -n "$Q" ]; then
  dapq eval ruler --tasks all --lengths 2048 --samples "$S" --methods learned --param "learned.queries=$Q" \
    --budgets 64,128,256 --out "runs/front-ruler-$(basename "$Q" .pt)"
elif [ "${PART:-grid}" = grid ]; then
  L=${LENGTH:-2048}
  # TASKS=a,b,... and OUT=runs/...: one share of the tasks per 1-thread process (merge the folders with `dapq merge`)
  dapq eval ruler --tasks "${TASKS:-all}" --lengths "$L" --samples "$S" --methods full,snapkv,dapq,laq,learned \
    --budgets 64,128,256 --out "${OUT:-runs/front-ruler-$L}"
elif [ "$PART" = niah ]; then
  # 7 lengths x 10 depths, budget 128; seed the folder with docs/results/estimators/niah.jsonl.gz (or, to resume,
  # docs/results/front/niah-est-grid.jsonl.gz) first
  dapq eval niah --methods full,snapkv,dapq,laq,learned --budgets 128 --lengths 1000-4000:500 --depths 10 \
    --out runs/front-niah
else
  echo "scripts/front/sweep.sh: PART must be grid or niah, not '$PART'." >&2
  exit 2
fi
