#!/usr/bin/env bash
# Several replicas behind one data layer: 300 simulated leaves (spread over
# the replicas) upload whole rounds to 3 "branchkey serve" processes sharing
# one PostgreSQL database and one blob store (a shared directory), then the
# same load goes to 1 replica. Prints, per setup, the aggregate ingest rate
# and the round latency (last 201 -> aggregation recorded), and the ratio.
#
#   bash bench/replicas.sh          # from the repository root
# Env: LEAVES (300), MB (4, per update), ROUNDS (3), REPLICAS (3),
#      PG (postgres://postgres@127.0.0.1:5432), BENCH_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
leaves=${LEAVES:-300}
mb=${MB:-4}
rounds=${ROUNDS:-3}
replicas=${REPLICAS:-3}
pg=${PG:-postgres://postgres@127.0.0.1:5432}
work=${BENCH_DIR:-/tmp/branchkey-bench}/replicas
rm -rf "$work" && mkdir -p "$work"
go build -o "$work/branchkey" ./cmd/branchkey
go build -o "$work/upload" ./bench/upload
token=bench-admin-token-0123456789
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

run_set() { # n: start n replicas on a fresh database, run the rounds, stop them
  local n=$1 db=bk_bench_${1}_$$ urls=() mine=()
  psql "$pg/postgres" -qc "CREATE DATABASE $db" >/dev/null
  for i in $(seq 0 $((n - 1))); do
    local port=$((9200 + 10 * n + i))
    BRANCHKEY_ADMIN_TOKEN=$token "$work/branchkey" serve --addr "127.0.0.1:$port" \
      --database "$pg/$db?sslmode=disable" --blobs "file://$work/blobs-$n" --data "$work/data-$n-$i" \
      --log-level warn > "$work/serve-$n-$i.log" 2>&1 &
    pids+=($!) mine+=($!)
    urls+=("http://127.0.0.1:$port")
  done
  for u in "${urls[@]}"; do
    for _ in $(seq 100); do curl -fs -o /dev/null "$u/healthz" && break; sleep 0.1; done
  done
  "$work/upload" rounds --servers "$(IFS=,; echo "${urls[*]}")" --admin-token "$token" \
    --leaves "$leaves" --mb "$mb" --rounds "$rounds" > "$work/rounds-$n.jsonl"
  kill "${mine[@]}" 2>/dev/null || true
  wait "${mine[@]}" 2>/dev/null || true
  psql "$pg/postgres" -qc "DROP DATABASE $db WITH (FORCE)" >/dev/null
}
run_set "$replicas"
run_set 1

/usr/bin/python3 - "$work/rounds-$replicas.jsonl" "$work/rounds-1.jsonl" "$leaves" "$mb" <<'PY'
import json, statistics, sys
def load(p):
    rows = [json.loads(l) for l in open(p)]
    return rows, statistics.median(r["ingest_mb_per_s"] for r in rows), statistics.median(r["round_latency_s"] for r in rows)
many, many_mbs, many_lat = load(sys.argv[1])
one, one_mbs, one_lat = load(sys.argv[2])
print(f"{sys.argv[3]} leaves x {sys.argv[4]} MB per round, {len(many)} rounds (medians); PostgreSQL + shared file blob store")
print(f"{'setup':<14} {'ingest MB/s':>12} {'round latency s':>16} {'aggregation s':>14}  modes")
for name, rows, mbs, lat in ((f"{many[0]['servers']} replicas", many, many_mbs, many_lat), ("1 replica", one, one_mbs, one_lat)):
    agg = statistics.median(r["aggregation_s"] for r in rows)
    print(f"{name:<14} {mbs:12.0f} {lat:16.2f} {agg:14.2f}  {sorted(set(r['mode'] for r in rows))}")
print(f"ingest ratio {many[0]['servers']} replicas / 1 replica: {many_mbs / one_mbs:.2f}; round latency ratio: {many_lat / one_lat:.2f}")
PY
