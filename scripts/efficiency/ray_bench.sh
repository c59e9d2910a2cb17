#!/usr/bin/env bash
# docs/results/efficiency.md, "Ray": one small NIAH sweep three ways on this machine (run it alone: nothing else on
# the cores). Wall times from bash's `time`; the Ray runs print their start-up time and per-worker throughput.
cd "$(dirname "$0")/../.."  # the repository root
set -e
A=(eval niah --lengths 1000,2000 --depths 3 --methods full,snapkv,dapq --budgets 128)
OUT=${OUT:-runs/ray-bench}
rm -rf "$OUT"
time dapq "${A[@]}" --out "$OUT/single"
time dapq "${A[@]}" --out "$OUT/ray1" --ray --workers 1 --threads-per-worker 2
time dapq "${A[@]}" --out "$OUT/ray2" --ray --workers 2 --threads-per-worker 1
