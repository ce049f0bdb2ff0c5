#!/usr/bin/env bash
# Decoding a 400 MB float32 update: branchkey's codec (indexing mode and fully
# materialized) against np.load(allow_pickle=True) on the same file.
#
#   bash bench/decode.sh            # from the repository root
#
# Env: BRANCHKEY_SHARED (default ../shared), BENCH_DIR (default /tmp/branchkey-bench),
#      PARAMS (default 100000000 float32 parameters = 400 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${BRANCHKEY_SHARED:-../shared}
py=/usr/bin/python3
params=${PARAMS:-100000000}
dir=${BENCH_DIR:-/tmp/branchkey-bench}/decode-$params
file=$dir/leaf0000.npy
if [ ! -f "$file" ]; then
  "$py" "$shared/bench/fedavg_numpy.py" make "$dir" --leaves 1 --params "$params" >/dev/null
fi
bytes=$(stat -c %s "$file")
cat "$file" >/dev/null # warm the page cache for both sides alike

np_s=$("$py" - "$file" <<'PY'
import sys, time
import numpy as np
best = float("inf")
for _ in range(3):
    t = time.perf_counter()
    a = np.load(sys.argv[1], allow_pickle=True)
    s = sum(p.nbytes for p in a[1])
    best = min(best, time.perf_counter() - t)
    del a
print(f"{best:.6f}")
PY
)

# one decode per fresh process: every page of the result is faulted in anew
go build -o "$dir/decode" ./bench/decode
cold_s=$(for _ in 1 2 3 4 5; do "$dir/decode" "$file"; done | sort -n | head -1)

out=$(BRANCHKEY_BENCH_FILE=$file go test -run '^$' -bench 'BenchmarkIndex$|BenchmarkDecode$' -benchtime 5x -count 3 ./weights/)
best() { echo "$out" | awk -v n="$1" '$1 ~ "^"n"-" {print $3}' | sort -n | head -1; }
idx_ns=$(best BenchmarkIndex)
dec_ns=$(best BenchmarkDecode)

awk -v b="$bytes" -v np="$np_s" -v idx="$idx_ns" -v dec="$dec_ns" -v cold="$cold_s" 'BEGIN {
  idx_s = idx / 1e9; dec_s = dec / 1e9
  printf "file: %.0f MB float32 update (%d bytes)\n", b / 1e6, b
  printf "%-36s %10s %10s %12s\n", "reader", "seconds", "GB/s", "vs np.load"
  printf "%-36s %10.4f %10.2f %12s\n", "np.load(allow_pickle=True)", np, b / np / 1e9, "1.0x"
  printf "%-36s %10.4f %10.2f %11.1fx\n", "branchkey materialize, in a loop", dec_s, b / dec_s / 1e9, np / dec_s
  printf "%-36s %10.4f %10.2f %11.1fx\n", "branchkey materialize, fresh process", cold, b / cold / 1e9, np / cold
  printf "%-36s %10.6f %10.0f %11.0fx\n", "branchkey index (IndexFile)", idx_s, b / idx_s / 1e9, np / idx_s
  printf "goals: index >= 2 GB/s: %s; materialize >= 3x numpy: %s in a loop (np.load is timed in a loop too), %s in a fresh process\n", (b / idx_s / 1e9 >= 2) ? "met" : "MISSED", (np / dec_s >= 3) ? "met" : "MISSED", (np / cold >= 3) ? "met" : "missed"
}'
