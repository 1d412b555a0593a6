#!/usr/bin/env bash
# Build the image and bring up docker/docker-compose.yml with rootful podman (offline, via the
# shared container-check tool) on a fresh volume, wait for /readyz, run one real search from
# the host, then bring it up a second time to show the volume is reused (no retraining).
# Prints build time, image size, time to /readyz and the search response.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOL=${CONTAINER_CHECK_TOOL:-../shared/tools/container-check.sh}
COMPOSE=docker/docker-compose.yml
PORT=${IMGSIM_PUBLISH_PORT:-8000}
DATA=${CIFAR:-../shared/data/cifar10-jpg.tar.gz}
URL="http://127.0.0.1:$PORT"

t0=$(date +%s)
bash "$TOOL" --setup-only
export CONTAINERS_CONF=/tmp/container-check/containers.conf PATH=/tmp/container-check/venv/bin:$PATH
compose() { podman-compose -f "$COMPOSE" "$@"; }
# Each run leaves the previous images untagged, about 6.5 GB per run. On exit, remove those of
# this project only (label set in the Dockerfile), never other untagged images on the machine.
cleanup() {
  compose down -t 5 >/dev/null 2>&1 || true
  podman image prune -f --filter label=io.imgsim.image=1 >/dev/null 2>&1 || true
}
trap cleanup EXIT
compose down -v -t 5 >/dev/null 2>&1 || true   # start from an empty volume, like a fresh machine

# Build both targets one after the other so the shared `build` stage is built once and
# cached; the compose `up --build` below then only reuses layers.
t1=$(date +%s)
podman build -q --target prepare -t imgsim-prepare:latest . >/dev/null
podman build -q --target runtime -t imgsim:latest .
t2=$(date +%s)
echo "container-check: image build took $(( t2 - t1 )) s"
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'imgsim' | sed 's/^/container-check: image /'

bash "$TOOL" --compose "$COMPOSE" --url "$URL/readyz" --timeout "${TIMEOUT:-900}" --keep
t3=$(date +%s)
echo "container-check: first up (prepare job: weights, training, index) -> /readyz 200 after $(( t3 - t2 )) s"

tar -xzOf "$DATA" test/cat/0000.jpg > /tmp/imgsim-container-query.jpg
resp=$(curl -fsS -F file=@/tmp/imgsim-container-query.jpg -F k=5 "$URL/v1/search")
echo "container-check: search response: $resp"
n=$(python3 -c "import json,sys; print(len(json.loads(sys.argv[1])['results']))" "$resp")
[ "$n" = 5 ] || { echo "container-check: FAILED: expected 5 results, got $n" >&2; exit 1; }

compose down -t 5 >/dev/null 2>&1
t4=$(date +%s)
compose up -d >/dev/null 2>&1
until curl -fsS -m 5 "$URL/readyz" >/dev/null 2>&1; do
  [ $(( $(date +%s) - t4 )) -lt 300 ] || { echo "container-check: FAILED: second up not ready" >&2; exit 1; }
  sleep 2
done
echo "container-check: second up -> /readyz 200 after $(( $(date +%s) - t4 )) s; prepare said: $(compose logs prepare 2>&1 | sed 's/\x1b\[[0-9;]*m//g; s/.*| //' | grep -E 'exists|done' | tail -3 | tr '\n' ' ')"
compose logs prepare 2>&1 | grep -q "not retraining" || { echo "container-check: FAILED: second up retrained" >&2; exit 1; }
echo "container-check: PASSED in $(( $(date +%s) - t0 )) s (5 search results from the container; volume reused)"
