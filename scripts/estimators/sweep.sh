#!/usr/bin/env bash
# The accuracy grids of docs/results/estimators.md, budget 128 (rerun to resume): RULER 2k, then RULER 4k, then
# NIAH 7 lengths x 10 depths. The joint table: scripts/estimators/joint_table.py.
cd "$(dirname "$0")/../.."  # the repository root
M=${METHODS:-full,snapkv,dapq,laq,expected_attention,kvzip,speckv}
B=${BUDGETS:-128}
dapq eval ruler --tasks all --lengths 2048 --samples 10 --methods "$M" --budgets "$B" --out runs/est-ruler
dapq eval ruler --tasks all --lengths 4096 --samples 10 --methods "$M" --budgets "$B" --out runs/est-ruler
dapq eval niah --methods "$M" --budgets "$B" --lengths 1000-4000:500 --depths 10 --out runs/est-niah
