#!/usr/bin/env bash
# The demo's models and index, for `make demo` / `make demo-build`.
# Usage: scripts/demo-build.sh VENV_BIN DEMO_DIR [DATA [BACKBONE]]
#   DATA empty: CIFAR-10 from ../shared/data, else Keras' download (needs the internet): a
#               ResNet50 fine-tuned on a sample, and its index.
#   DATA a folder of your own images (any tree, labels or not): ImageNet features of
#               BACKBONE (resnet50, vgg16 or inceptionv3, optionally :SIZE; default resnet50),
#               no training, and the folder's index.
# Steps whose output exists are skipped, so a second run starts serving at once.
set -euo pipefail
BIN=$1 DEMO=$2 DATA=${3:-} BACKBONE=${4:-resnet50}
SHARED=../shared/data/cifar10-jpg.tar.gz
mkdir -p "$DEMO"
if [ -n "$DATA" ]; then
  [ -d "$DATA" ] || { echo "demo: DATA=$DATA is not a folder; pass DATA=~/photos (any folder of images)" >&2; exit 2; }
  echo "demo: your images in $DATA, with ImageNet $BACKBONE features (no training)"
  "$BIN/imgsim" weights --backbone "${BACKBONE%%:*}" --quiet
  INDEX="$DEMO/photos-index"
  [ "$BACKBONE" = resnet50 ] || INDEX="$DEMO/photos-${BACKBONE//:/-}-index"
  if [ -e "$INDEX/manifest.json" ]; then  # built before: bring it up to date
    "$BIN/imgsim" index sync --index "$INDEX" --data "$DATA"
  else
    "$BIN/imgsim" index build --model "$BACKBONE" --data "$DATA" --out "$INDEX"
  fi
  echo "$BACKBONE $INDEX" > "$DEMO/serve"
  exit 0
fi
if [ -f "$SHARED" ]; then
  DATA=$SHARED
  echo "demo: CIFAR-10 from $SHARED"
else
  if ! "$BIN/python" -c "import urllib.request; urllib.request.urlopen('https://storage.googleapis.com', timeout=5)" 2>/dev/null; then
    echo "demo: no data: $SHARED is not here and Keras cannot download CIFAR-10 (no internet)." >&2
    echo "demo: run it on your own images instead: make demo DATA=~/photos" >&2
    exit 2
  fi
  DATA=keras:cifar10
  echo "demo: $SHARED not found; using keras:cifar10 (Keras downloads CIFAR-10, about 170 MB)"
fi
"$BIN/imgsim" weights --quiet
test -f "$DEMO/resnet50-demo/manifest.json" || "$BIN/imgsim" train --backbone resnet50 --data "$DATA" \
  --out "$DEMO/resnet50-demo" --input-size 64 --trainable frozen --max-per-class 500 --epochs 15 --patience 3
test -e "$DEMO/resnet50-demo-index/manifest.json" || "$BIN/imgsim" index build --model "$DEMO/resnet50-demo" \
  --data "$DATA" --out "$DEMO/resnet50-demo-index"
echo "$DEMO/resnet50-demo $DEMO/resnet50-demo-index" > "$DEMO/serve"
