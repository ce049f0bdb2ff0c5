#!/usr/bin/env bash
# bench/aggregate.sh: branchkey aggregate against the numpy peer.
#
# For each case (N updates of P float32 parameters) it makes the updates with
# the peer's own generator, then on the same files runs, one after another,
#   fedavg_numpy.py run --mode all     (every update in memory, as Flower does)
#   fedavg_numpy.py run --mode stream  (one update at a time, numpy at its leanest)
#   branchkey aggregate --sync=false   (blocked fedavg; no fsync of the
#                                       output, as np.save does none)
# each REPEAT times (the best and median wall times are reported, and the
# largest peak RSS from /usr/bin/time -v), and prints a table with the ratios
# and whether the results agree within float32 rounding (checked with numpy).
#
# Run from the repository root: bash bench/aggregate.sh
# Environment:
#   BRANCHKEY_SHARED  the shared directory holding bench/fedavg_numpy.py (../shared)
#   PYTHON            a python3 with numpy (/usr/bin/python3)
#   CASES             "LEAVESxPARAMS ..." ("10x10000000 100x1000000 3x100000000")
#   REPEAT            runs per tool and case (5); the machine may be shared,
#                     so the best run is compared, the median shown too
#   BENCH_DIR         work directory for the updates and outputs (a new temporary
#                     one); updates already there are reused
#   BENCH_KEEP=1      keep the work directory afterwards
set -euo pipefail

SHARED=${BRANCHKEY_SHARED:-../shared}
PEER=$SHARED/bench/fedavg_numpy.py
PYTHON=${PYTHON:-/usr/bin/python3}
CASES=${CASES:-"10x10000000 100x1000000 3x100000000"}
REPEAT=${REPEAT:-5}

[[ -f go.mod && -d cmd/branchkey ]] || { echo "run from the repository root" >&2; exit 2; }
[[ -f $PEER ]] || { echo "no peer at $PEER (set BRANCHKEY_SHARED)" >&2; exit 2; }
[[ -x /usr/bin/time ]] || { echo "needs /usr/bin/time (Debian: time)" >&2; exit 2; }
"$PYTHON" -c 'import numpy' 2>/dev/null || { echo "$PYTHON has no numpy (set PYTHON)" >&2; exit 2; }

if [[ -n ${BENCH_DIR:-} ]]; then
	WORK=$BENCH_DIR
	mkdir -p "$WORK"
else
	WORK=$(mktemp -d "${TMPDIR:-/tmp}/branchkey-bench.XXXXXX")
	if [[ ${BENCH_KEEP:-} != 1 ]]; then
		trap 'rm -rf "$WORK"' EXIT
	fi
fi
echo "work directory: $WORK$([[ ${BENCH_KEEP:-} == 1 || -n ${BENCH_DIR:-} ]] && echo ' (kept)' || echo ' (removed at exit; BENCH_KEEP=1 keeps it)')"

BK=$WORK/branchkey
go build -o "$BK" ./cmd/branchkey

# The issue's yardstick: one thread that only reads the bytes and sums them
# as float32 (about 0.18 s for 10 x 10M on this machine when it is idle).
# Built when a C compiler is at hand; it tells how busy the machine is.
CSUM=
if command -v cc >/dev/null; then
	cat >"$WORK/readsum.c" <<'EOF'
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
	static float buf[1 << 18];
	double s = 0;
	for (int i = 1; i < argc; i++) {
		int fd = open(argv[i], O_RDONLY);
		ssize_t n;
		while ((n = read(fd, buf, sizeof buf)) > 0)
			for (ssize_t j = 0; j < n / 4; j++) s += buf[j];
		close(fd);
	}
	printf("%g\n", s);
	return 0;
}
EOF
	cc -O2 -o "$WORK/readsum" "$WORK/readsum.c" && CSUM=$WORK/readsum
fi
echo "machine: $(nproc) cores, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "numpy $("$PYTHON" -c 'import numpy; print(numpy.__version__)'), $(go version | cut -d' ' -f3)"

# timed LOG CMD...: runs CMD under /usr/bin/time -v; leaves "seconds kib cpu"
# in $LOG: the wall time measured around it (time -v prints only
# centiseconds), time -v's peak RSS and user+system CPU seconds.
timed() {
	local log=$1
	shift
	local t0=$EPOCHREALTIME
	/usr/bin/time -v -o "$log.time" "$@" >"$log.out" 2>"$log.err" || {
		echo "failed: $*" >&2
		cat "$log.err" "$log.out" >&2
		exit 1
	}
	local t1=$EPOCHREALTIME
	awk -F': ' -v t0="$t0" -v t1="$t1" '
		/Maximum resident set size/ { k = $2 }
		/User time \(seconds\)|System time \(seconds\)/ { c += $2 }
		END { printf "%.3f %d %.2f\n", t1 - t0, k, c }' "$log.time" >"$log"
}

# bench_tool NAME OUT CMD...: runs CMD REPEAT times (removing OUT before
# each run) and prints "best median max-rss-kib min-cpu".
bench_tool() {
	local name=$1 out=$2
	shift 2
	local runs=()
	for ((r = 0; r < REPEAT; r++)); do
		rm -f "$out"
		sync # the previous run's output goes to disk now, not during this one
		timed "$WORK/$name.$r" "$@"
		runs+=("$(cat "$WORK/$name.$r")")
	done
	printf '%s\n' "${runs[@]}" | sort -n -k1,1 | awk '
		{ s[NR] = $1; if ($2 > k) k = $2; if (NR == 1 || $3 < c) c = $3 }
		END { printf "%s %s %d %s\n", s[1], s[int((NR + 1) / 2)], k, c }'
}

# agree A B MAXULP: "yes" when the two updates have the same num_samples,
# dtypes and shapes and every value is within MAXULP float32 ulps, an ulp
# taken at the larger of the value and its tensor's mean magnitude. Against
# numpy's stream mode (float64 sums, like branchkey) MAXULP is 1: the two
# differ by one float32 rounding at most. numpy's all mode sums N float32
# products in float32, each sum rounding once, so it can be N ulps off the
# exact mean itself: MAXULP is N+1 there.
agree() {
	"$PYTHON" - "$1" "$2" "$3" <<'EOF'
import sys, numpy as np
a = np.load(sys.argv[1], allow_pickle=True); b = np.load(sys.argv[2], allow_pickle=True)
maxulp = float(sys.argv[3])
ok = a[0] == b[0] and len(a[1]) == len(b[1])
worst = 0.0
for x, y in zip(a[1], b[1]):
    ok = ok and x.dtype == y.dtype and x.shape == y.shape
    x = x.astype(np.float64); y = y.astype(np.float64)
    scale = np.maximum(np.abs(y), np.abs(y).mean())
    err = np.abs(x - y) / (scale * np.finfo(np.float32).eps)
    worst = max(worst, float(err.max()) if err.size else 0.0)
print(("yes" if ok and worst <= maxulp else "NO") + f" ({worst:.2f} ulp)")
EOF
}

declare -a ROWS
FMT='%-12s %-13s %7s %7s %6s %6s %8s %13s %13s  %s'
goals_ok=1
for c in $CASES; do
	leaves=${c%x*}
	params=${c#*x}
	dir=$WORK/${leaves}x${params}
	if ! compgen -G "$dir/leaf*.npy" >/dev/null; then
		echo "making $leaves updates of $params float32 parameters in $dir"
		"$PYTHON" "$PEER" make "$dir" --leaves "$leaves" --params "$params" >/dev/null
		sync # so that writing the updates back does not run during the timings
	fi
	files=("$dir"/leaf*.npy)
	bytes=$(cat "${files[@]}" | wc -c)
	update_bytes=$(stat -c %s "${files[0]}")
	echo "running $leaves x $params ($((bytes / 1048576)) MiB of updates) ..."
	read -r t_all m_all k_all c_all < <(bench_tool np_all "$WORK/np_all.npy" "$PYTHON" "$PEER" run "$WORK/np_all.npy" "${files[@]}" --mode all)
	read -r t_str m_str k_str c_str < <(bench_tool np_stream "$WORK/np_stream.npy" "$PYTHON" "$PEER" run "$WORK/np_stream.npy" "${files[@]}" --mode stream)
	if [[ -n $CSUM ]]; then
		read -r t_c m_c k_c c_c < <(bench_tool c_readsum "$WORK/none" "$CSUM" "${files[@]}")
	fi
	read -r t_bk m_bk k_bk c_bk < <(bench_tool bk "$WORK/bk.npy" "$BK" aggregate --sync=false -o "$WORK/bk.npy" "${files[@]}")
	ag_all=$(agree "$WORK/bk.npy" "$WORK/np_all.npy" $((leaves + 1)))
	ag_str=$(agree "$WORK/bk.npy" "$WORK/np_stream.npy" 1)
	r_all=$(awk -v a="$t_all" -v b="$t_bk" 'BEGIN { printf "%.1f", a / b }')
	r_str=$(awk -v a="$t_str" -v b="$t_bk" 'BEGIN { printf "%.1f", a / b }')
	rss_goal=$(awk -v u="$update_bytes" 'BEGIN { printf "%d", (1.2 * u + 64 * 1048576) / 1024 }')
	verdict=$(awk -v ra="$r_all" -v rs="$r_str" -v k="$k_bk" -v g="$rss_goal" 'BEGIN {
		v = (ra >= 12 ? "" : " all<12x") (rs >= 5 ? "" : " stream<5x") (k <= g ? "" : " rss>goal")
		print v == "" ? "met" : "MISSED:" v }')
	[[ $verdict == met ]] || goals_ok=0
	gbps() { awk -v b="$bytes" -v t="$1" 'BEGIN { printf "%.2f", b / t / 1e9 }'; }
	mib() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }
	mr_all=$(awk -v a="$m_all" -v b="$m_bk" 'BEGIN { printf "%.1f", a / b }')
	mr_str=$(awk -v a="$m_str" -v b="$m_bk" 'BEGIN { printf "%.1f", a / b }')
	ROWS+=("$(printf "$FMT" "${leaves}x${params}" numpy-all "$t_all" "$m_all" "$c_all" "$(gbps "$t_all")" "$(mib "$k_all")" "" "" "")")
	ROWS+=("$(printf "$FMT" "" numpy-stream "$t_str" "$m_str" "$c_str" "$(gbps "$t_str")" "$(mib "$k_str")" "" "" "")")
	if [[ -n $CSUM ]]; then
		ROWS+=("$(printf "$FMT" "" "C read+sum" "$t_c" "$m_c" "$c_c" "$(gbps "$t_c")" "$(mib "$k_c")" "" "" "(one thread, reads and sums only: a yardstick)")")
	fi
	ROWS+=("$(printf "$FMT" "" branchkey "$t_bk" "$m_bk" "$c_bk" "$(gbps "$t_bk")" "$(mib "$k_bk")" "${r_all}x (${mr_all}x)" "${r_str}x (${mr_str}x)" "vs all: $ag_all; vs stream: $ag_str")")
	ROWS+=("$(printf "$FMT" "" "goal" "" "" "" "" "<=$(mib "$rss_goal")" ">=12x" ">=5x" "$verdict")")
done

echo
printf "$FMT\n" case tool best median cpu GB/s "RSS MiB" "vs all" "vs stream" "agree (within float32 rounding)"
printf '%s\n' "${ROWS[@]}"
echo
echo "best, median: wall seconds of $REPEAT runs, process start to exit, files warm in the page cache;"
echo "cpu: the least user+system CPU seconds of a run (the load of other processes moves it least);"
echo "GB/s: update bytes / best; ratios: numpy's best / branchkey's best (medians in parentheses);"
echo "RSS: largest peak resident set of the runs (/usr/bin/time -v); goal: 1.2 x one update + 64 MiB."
echo "branchkey runs with --sync=false: like np.save it leaves writing the output to disk to the OS."
[[ $goals_ok == 1 ]] && echo "all goals met" || echo "some goals missed"
