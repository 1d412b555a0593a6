#!/usr/bin/env bash
# One-shot job: ImageNet weights -> trained model -> index, into /data (a named volume).
# Every step is skipped when its output exists, so re-running `up` does not retrain.
set -euo pipefail
DATA_SPEC=${IMGSIM_DEMO_DATA:-/datasets/cifar10-jpg.tar.gz}
MODEL=${IMGSIM_DEMO_MODEL_DIR:-/data/models/demo}
INDEX=${IMGSIM_DEMO_INDEX_DIR:-/data/indexes/demo}
BACKBONE=${IMGSIM_DEMO_BACKBONE:-resnet50}
SIZE=${IMGSIM_DEMO_INPUT_SIZE:-64}
PER_CLASS=${IMGSIM_DEMO_MAX_PER_CLASS:-500}

if [ "${IMGSIM_SKIP_PREPARE:-0}" = 1 ]; then echo "prepare: skipped (IMGSIM_SKIP_PREPARE=1)"; exit 0; fi
if [ ! -e "$DATA_SPEC" ] && [ "${DATA_SPEC#keras:}" = "$DATA_SPEC" ]; then
  echo "prepare: dataset $DATA_SPEC not found; mount a labelled image folder and set IMGSIM_DEMO_DATA," \
       "or use IMGSIM_DEMO_DATA=keras:cifar10 (needs the internet)" >&2
  exit 1
fi
imgsim weights --backbone "$BACKBONE" --quiet
if [ -f "$MODEL/manifest.json" ]; then
  echo "prepare: model $MODEL exists, not retraining"
else
  imgsim train --backbone "$BACKBONE" --data "$DATA_SPEC" --out "$MODEL" --input-size "$SIZE" \
    --trainable frozen --max-per-class "$PER_CLASS" --epochs 15 --patience 3 --quiet
fi
if [ -f "$INDEX/manifest.json" ]; then
  echo "prepare: index $INDEX exists, not rebuilding"
else
  imgsim index build --model "$MODEL" --data "$DATA_SPEC" --out "$INDEX" --quiet
fi
echo "prepare: done"
