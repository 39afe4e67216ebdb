#!/usr/bin/env bash
# The emulated ECR (moto + distribution on moto's S3) and ecr-twisted in front of it, on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${DEMO_PORT:-5000}
metrics=${DEMO_METRICS_PORT:-9100}
work=.work/demo
rm -rf "$work"
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

.venv/bin/python -m ecr_twisted.testing.emulator --workdir "$work/ecr" >"$work/ecr.json" 2>"$work/ecr.log" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/ecr.json" ] && break; sleep 0.3; done
[ -s "$work/ecr.json" ] || { echo "the emulated ECR did not start:"; tail -20 "$work/ecr.log"; exit 1; }
field() { .venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$work/ecr.json" "$1"; }

AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_EC2_METADATA_DISABLED=true \
.venv/bin/twistd -n --pidfile= ecrproxy \
  --port "tcp:$port:interface=127.0.0.1" --metrics-port "tcp:$metrics:interface=127.0.0.1" \
  --anonymous --region "$(field region)" --registry-id "$(field registry_id)" \
  --cache-dir "$work/cache" --cache-size 1GiB --storage-hosts 'http://localhost:*' \
  --ecr-endpoint-url "$(field ecr_endpoint_url)" --upstream "$(field upstream_url)" >"$work/proxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$metrics/readyz" >/dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$metrics/readyz" >/dev/null || { echo "the proxy did not become ready:"; tail -20 "$work/proxy.log"; exit 1; }

# something to pull: a small image, pushed through the proxy
.venv/bin/python - "$work/image" <<'PY'
import pathlib, sys
from ecr_twisted.testing.images import make_oci_layout, make_tar_layer
make_oci_layout(pathlib.Path(sys.argv[1]), [make_tar_layer({"hello.txt": b"hello from ecr-twisted\n"})], "1.0")
PY
skopeo copy -q --dest-tls-verify=false "oci:$work/image:1.0" "docker://127.0.0.1:$port/demo/hello:1.0"

cat <<TXT

ecr-twisted is running on http://127.0.0.1:$port in front of an emulated ECR
(upstream $(field upstream_url), ECR API $(field ecr_endpoint_url)); demo/hello:1.0 is pushed.
Try:
  skopeo inspect --tls-verify=false docker://127.0.0.1:$port/demo/hello:1.0
  skopeo copy --src-tls-verify=false docker://127.0.0.1:$port/demo/hello:1.0 oci:/tmp/hello:1.0
  skopeo copy --dest-tls-verify=false oci:/tmp/hello:1.0 docker://127.0.0.1:$port/demo/copy:1.0
  podman pull --tls-verify=false 127.0.0.1:$port/demo/hello:1.0
  curl -s http://127.0.0.1:$port/v2/demo/hello/tags/list
  curl -s http://127.0.0.1:$metrics/metrics | grep ^ecrproxy_
  curl -s -o /dev/null -D - http://127.0.0.1:$port/v2/demo/hello/manifests/1.0 | grep -i x-cache   # the layer cache: $work/cache
Logs: $work/proxy.log (access log follows). Ctrl-C stops everything.

TXT
tail -n +1 -f "$work/proxy.log" &
pids+=($!)
wait "${pids[1]}"
