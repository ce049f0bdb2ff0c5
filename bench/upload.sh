#!/usr/bin/env bash
# 50 concurrent leaves each upload a 40 MB update over loopback, to branchkey
# (validation, storage, fsync, recording, incremental FedAvg folding and the
# round's aggregation included) and to a bare Go handler that only writes and
# fsyncs the body. Prints MB/s and p50/p99 latency of each and the ratio.
#
#   bash bench/upload.sh            # from the repository root
# Env: LEAVES (50), MB (40), RUNS (3, the best of which is reported), BENCH_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
leaves=${LEAVES:-50}
mb=${MB:-40}
runs=${RUNS:-3}
work=${BENCH_DIR:-/tmp/branchkey-bench}/upload
rm -rf "$work" && mkdir -p "$work"
go build -o "$work/branchkey" ./cmd/branchkey
go build -o "$work/upload" ./bench/upload
token=bench-admin-token-0123456789
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
wait_up() { for _ in $(seq 100); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; return 1; }

BRANCHKEY_ADMIN_TOKEN=$token "$work/branchkey" serve --addr 127.0.0.1:9101 --data "$work/data" \
  --log-level warn > "$work/serve.log" 2>&1 & pids+=($!)
mkdir -p "$work/bare"
"$work/upload" bare --addr 127.0.0.1:9102 --dir "$work/bare" & pids+=($!)
wait_up http://127.0.0.1:9101/healthz
wait_up http://127.0.0.1:9102/ || true

best() { # best MB/s of $runs runs of "$@", as its JSON line
  local bestline="" bestv=0
  for _ in $(seq "$runs"); do
    line=$("$@")
    v=$(echo "$line" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["mb_per_s"])')
    if /usr/bin/python3 -c "import sys; sys.exit(0 if $v > $bestv else 1)"; then bestv=$v; bestline=$line; fi
    rm -rf "$work/bare"/body-* 
  done
  echo "$bestline"
}
bk=$(best "$work/upload" load --server http://127.0.0.1:9101 --admin-token "$token" --leaves "$leaves" --mb "$mb")
bare=$(best "$work/upload" load --server http://127.0.0.1:9102 --bare --leaves "$leaves" --mb "$mb")

/usr/bin/python3 - "$bk" "$bare" "$leaves" "$mb" <<'PY'
import json, sys
bk, bare = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"{sys.argv[3]} leaves x {sys.argv[4]} MB, concurrent, over loopback (best of runs)")
print(f"{'handler':<44} {'MB/s':>8} {'p50 s':>8} {'p99 s':>8}")
for name, r in (("bare: write + fsync the body", bare), ("branchkey: validate, store, fsync, record, fold", bk)):
    print(f"{name:<44} {r['mb_per_s']:8.0f} {r['p50_s']:8.2f} {r['p99_s']:8.2f}")
ratio = bk["mb_per_s"] / bare["mb_per_s"]
print(f"branchkey / bare throughput: {ratio:.2f} (goal >= 0.70: {'met' if ratio >= 0.7 else 'MISSED'})")
PY
