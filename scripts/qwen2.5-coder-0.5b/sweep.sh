#!/usr/bin/env bash
# The second model's results (docs/results/qwen2.5-coder-0.5b.md; rerun to resume): Qwen2.5-Coder-0.5B-Instruct,
# installed from its six registry parts (`dapq models` prints the command). NIAH at 1k-4k with 5 depths, RULER 2k on
# niah_single_1/2/3 and niah_multikey_1 (10 samples each), FullKV and every eviction method at budgets 64/128/256,
# then the analysis suite's Table 1 / Figure 3 at 4k. `learned` is left out here: when these rows were made only
# SmolLM2's queries were shipped; Qwen's (shipped since) are evaluated in docs/results/learned-generic.md. Two cores: run the NIAH and RULER lines as
# two 1-thread processes (PART=niah / PART=ruler), each with OMP_NUM_THREADS=1. PART=bundled runs the same two grids
# on the bundled SmolLM2 (plus `learned`, whose shipped queries are for it), for the side-by-side orderings.
cd "$(dirname "$0")/../.."  # the repository root
Q=qwen2.5-coder-0.5b-instruct
M=${METHODS:-full,snapkv,pyramidkv,h2o,streamingllm,lacache,dapq,laq,laq++,expected_attention,kvzip,speckv}
B=${BUDGETS:-64,128,256}
PART=${PART:-all}
if [ "$PART" = all ] || [ "$PART" = niah ]; then
  dapq eval niah --model $Q --methods "$M" --budgets "$B" --lengths 1000-4000:1000 --depths 5 --out runs/qwen-niah
fi
if [ "$PART" = all ] || [ "$PART" = ruler ]; then
  dapq eval ruler --model $Q --tasks niah_single_1,niah_single_2,niah_single_3,niah_multikey_1 --lengths 2048 \
    --samples 10 --methods "$M" --budgets "$B" --out runs/qwen-ruler
fi
if [ "$PART" = all ] || [ "$PART" = analysis ]; then
  dapq analyze similarity --model $Q --length 4096 --trials 100 --offset-lengths 2048,4096,6144,8000 \
    --out runs/qwen-analysis-similarity
  dapq analyze recall --model $Q --length 4096 --samples 4 --budget 128 --out runs/qwen-analysis-recall
fi
if [ "$PART" = bundled ]; then
  dapq eval niah --methods "$M,learned" --budgets "$B" --lengths 1000-4000:1000 --depths 5 --out runs/smollm2-niah
  dapq eval ruler --tasks niah_single_1,niah_single_2,niah_single_3,niah_multikey_1 --lengths 2048 \
    --samples 10 --methods "$M,learned" --budgets "$B" --out runs/smollm2-ruler
fi
