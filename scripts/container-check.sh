#!/usr/bin/env bash
# Build the image and bring up docker/docker-compose.yml with rootful podman (offline, via the
# shared container-check tool), wait for /readyz, run one real search from the host, tear down.
# Prints build time, image size, time to /readyz and the search response.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOL=${CONTAINER_CHECK_TOOL:-../shared/tools/container-check.sh}
COMPOSE=docker/docker-compose.yml
PORT=${IMGSIM_PUBLISH_PORT:-8000}
DATA=${CIFAR:-../shared/data/cifar10-jpg.tar.gz}

t0=$(date +%s)
bash "$TOOL" --setup-only
export CONTAINERS_CONF=/tmp/container-check/containers.conf PATH=/tmp/container-check/venv/bin:$PATH
down() { podman-compose -f "$COMPOSE" down -t 5 >/dev/null 2>&1 || true; }
trap down EXIT
t1=$(date +%s)
# Build both targets one after the other so the shared `build` stage is built once and
# cached; the compose `up --build` below then only reuses layers.
podman build --target prepare -t imgsim-prepare:latest .
podman build --target runtime -t imgsim:latest .
t2=$(date +%s)
echo "container-check: image build took $(( t2 - t1 )) s"
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^(localhost/)?imgsim' || true

bash "$TOOL" --compose "$COMPOSE" --url "http://127.0.0.1:$PORT/readyz" --timeout "${TIMEOUT:-900}" --keep
t3=$(date +%s)
echo "container-check: compose up -> /readyz 200 took $(( t3 - t2 )) s (prepare job included)"

tar -xzOf "$DATA" test/cat/0000.jpg > /tmp/imgsim-container-query.jpg
resp=$(curl -fsS -F file=@/tmp/imgsim-container-query.jpg -F k=5 "http://127.0.0.1:$PORT/v1/search")
echo "container-check: search response: $resp"
n=$(python3 -c "import json,sys; print(len(json.loads(sys.argv[1])['results']))" "$resp")
[ "$n" = 5 ] || { echo "container-check: FAILED: expected 5 results, got $n" >&2; exit 1; }
echo "container-check: PASSED in $(( $(date +%s) - t0 )) s (5 search results from the container)"
