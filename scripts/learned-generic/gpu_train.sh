#!/usr/bin/env bash
# One GPU session of the generic recipe at scale (docs/results/learned-generic.md, "Thousands of prompts"):
#   1. K `dapq train-queries --build-only` processes fill one target store side by side until BUILD_S seconds (each
#      claims the next prompt not yet built, so the store fills in order);
#   2. the longest fully built prefix of the store is split into training and validation prompts (the last VAL);
#   3. three training runs on copies of that store, side by side, until TRAIN_S seconds: the embeddings alone, and
#      the capacity step (adapters at the pseudo positions) of rank 8 on the attention projections and of rank 16
#      on attention + MLP; each writes its best epoch by validation recall (a run stopped mid-epoch writes the best
#      finished one).
# Everything lands in $OUT (queries files, their .json records, logs). Environment: DEVICE (cuda), K (12 builder
# processes), PLAN (4000 prompts at most), VAL (100), BUILD_S (200), TRAIN_S (240), EPOCHS (3), TARGET (mean or
# copy: `dapq train-queries --target`), VARIANTS (the names of the runs below to train, default all three),
# TRAIN_MAX (train on at most this many of the built prompts, so that an epoch fits TRAIN_S).
set -u
OUT=${OUT:-runs/gpu-out}
DEVICE=${DEVICE:-cuda}
K=${K:-12}  # builder processes
PLAN=${PLAN:-4000}
VAL=${VAL:-100}
BUILD_S=${BUILD_S:-200}
TRAIN_S=${TRAIN_S:-240}
EPOCHS=${EPOCHS:-3}
TARGET=${TARGET:-mean}
VARIANTS=${VARIANTS:-emb lora8 lora16mlp}
TRAIN_MAX=${TRAIN_MAX:-100000}
WORK=${WORK:-runs/gpu-work}
mkdir -p "$OUT" "$WORK"
COMMON=(--device "$DEVICE" --dtype float32 --lengths 512-2048 --target "$TARGET")
stamp() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu.log"; }

stamp "start: $(python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())')"
if [ "${LOAD_CHECK:-1}" = 1 ]; then  # time one model load alone (LOAD_CHECK=0 skips it)
  python3 -c "from dapq.models import load_model; import time; t=time.time(); load_model(None, device='$DEVICE', dtype='float32'); print(f'model load {time.time()-t:.1f} s')" 2>&1 | tail -1 | tee -a "$OUT/gpu.log"
fi

stamp "building targets with $K processes for ${BUILD_S} s"
for k in $(seq 0 $((K - 1))); do
  OMP_NUM_THREADS=1 timeout "$BUILD_S" python3 -m dapq train-queries --out "$WORK/store.pt" --train "$((PLAN - VAL))" \
    --val "$VAL" "${COMMON[@]}" --build-only > "$WORK/build$k.log" 2>&1 &
done
wait
built=$(ls "$WORK/store.pt.targets" | grep -c '\.pt\.gz$')
prefix=$(python3 -c "
import pathlib; d = pathlib.Path('$WORK/store.pt.targets'); i = 0
while (d / f'{i:05d}.pt.gz').is_file(): i += 1
print(i)")
stamp "built $built target files; the longest complete prefix holds $prefix prompts"
tail -n 3 "$WORK/build0.log" >> "$OUT/gpu.log"
TRAIN=$((prefix - VAL))
if [ "$TRAIN" -gt "$TRAIN_MAX" ]; then TRAIN=$TRAIN_MAX; fi
if [ "$TRAIN" -lt "${MIN_TRAIN:-50}" ]; then stamp "too few prompts to train"; exit 1; fi

all_variants=("emb:--lora-rank 0" "lora8:--lora-rank 8" "lora16mlp:--lora-rank 16 --lora-lr 0.001 --lora-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
variants=()
for v in "${all_variants[@]}"; do
  for want in $VARIANTS; do [ "${v%%:*}" = "$want" ] && variants+=("$v"); done
done
for v in "${variants[@]}"; do
  name=${v%%:*}
  cp -r "$WORK/store.pt.targets" "$WORK/$name.pt.targets"
done
stamp "training ${variants[*]} on $TRAIN prompts (+ $VAL validation) for ${TRAIN_S} s, --epochs $EPOCHS"
for v in "${variants[@]}"; do
  name=${v%%:*}
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=2 timeout "$TRAIN_S" python3 -m dapq train-queries --out "$WORK/$name.pt" --train "$TRAIN" \
    --val "$VAL" "${COMMON[@]}" --epochs "$EPOCHS" ${v#*:} > "$WORK/$name.log" 2>&1 &
done
wait
for v in "${variants[@]}"; do
  name=${v%%:*}
  if [ ! -f "$WORK/$name.pt" ] && [ -f "$WORK/$name.pt.ckpt" ]; then  # stopped mid-epoch: write the best finished one
    done_epochs=$(python3 -c "import torch; print(torch.load('$WORK/$name.pt.ckpt', weights_only=True)['epoch'])")
    stamp "$name stopped after epoch $done_epochs: writing it"
    # shellcheck disable=SC2086
    python3 -m dapq train-queries --out "$WORK/$name.pt" --train "$TRAIN" --val "$VAL" "${COMMON[@]}" \
      --epochs "$done_epochs" ${v#*:} >> "$WORK/$name.log" 2>&1
  fi
  grep -E "validation before|^epoch|best epoch|targets ready" "$WORK/$name.log" | sed "s/^/$name: /" >> "$OUT/gpu.log"
  [ -f "$WORK/$name.pt" ] && cp "$WORK/$name.pt" "$WORK/$name.pt.json" "$OUT/"
done
stamp "done"
