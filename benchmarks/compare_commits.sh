#!/usr/bin/env bash
# Two commits side by side on this machine, in alternating rounds (the VM drifts 5-15 %):
# the service (c=1 p50, c=16 req/s; benchmarks/service.py) and `imgsim index build` (img/s),
# both on the default runtime. The harness is this checkout's; each side's service and
# indexer run that commit's code (a git worktree, put first on PYTHONPATH).
#
#   bash benchmarks/compare_commits.sh BEFORE AFTER INDEX_DIR DATA_FOLDER [ROUNDS] [MODEL]
#   bash benchmarks/compare_commits.sh ec95850 HEAD indexes/clothing-resnet50 ~/clothing 3 resnet50
set -euo pipefail
before=$1 after=$2 index=$3 data=$4 rounds=${5:-3} model=${6:-resnet50}
root=$(cd "$(dirname "$0")/.." && pwd)
py=$root/.venv/bin/python
out=$(mktemp -d /tmp/imgsim-compare-XXXX)
for side in before after; do
  git -C "$root" worktree add -q --detach "$out/$side" "${!side}"
done
trap 'for s in before after; do git -C "$root" worktree remove --force "$out/$s"; done' EXIT
for round in $(seq "$rounds"); do
  for side in before after; do
    (cd "$root" && PYTHONPATH="$out/$side" "$py" -m benchmarks.service --model "$model" --index "$index" \
      --concurrency 1,16 --requests 300 --json "$out/$side-$round.json" > "$out/$side-$round.log" 2>&1)
    (cd "$out/$side" && PYTHONPATH="$out/$side" "$py" -m app.cli index build --model "$model" --data "$data" \
      --max-per-class 100 --out "$out/index-$side" -q 2>&1 | grep indexed > "$out/$side-$round.index")
    rm -rf "$out/index-$side" "$out/.index-$side.imgsim"
  done
done
"$py" - "$out" "$rounds" <<'PY'
import json, re, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
for side in ("before", "after"):
    p50, rps, img = [], [], []
    for r in range(1, rounds + 1):
        levels = {lv["concurrency"]: lv for lv in json.load(open(f"{out}/{side}-{r}.json"))["levels"]}
        p50.append(levels[1]["latency_ok"]["p50_ms"]); rps.append(levels[16]["ok_per_s"])
        img.append(float(re.search(r"= ([0-9.]+) img/s", open(f"{out}/{side}-{r}.index").read())[1]))
    print(f"{side}: c=1 p50 {p50} ms (median {statistics.median(p50)}), c=16 {rps} req/s "
          f"(median {statistics.median(rps)}), index build {img} img/s (median {statistics.median(img)})")
PY
