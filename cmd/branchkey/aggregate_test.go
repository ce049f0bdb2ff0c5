package main

import (
	"context"
	"encoding/json"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/branchkey/branchkey/aggregate"
	"github.com/branchkey/branchkey/weights"
)

// aggFixtures is the numpy-made test data.
const aggFixtures = "../../testdata/fixtures"

// aggRun runs a command line and returns its exit code, stdout and
// stderr.
func aggRun(tb testing.TB, args ...string) (int, string, string) {
	tb.Helper()
	dir := tb.TempDir()
	outF, err := os.Create(filepath.Join(dir, "stdout"))
	if err != nil {
		tb.Fatal(err)
	}
	errF, err := os.Create(filepath.Join(dir, "stderr"))
	if err != nil {
		tb.Fatal(err)
	}
	oldOut, oldErr := os.Stdout, os.Stderr
	os.Stdout, os.Stderr = outF, errF
	code := run(context.Background(), args)
	os.Stdout, os.Stderr = oldOut, oldErr
	outF.Close()
	errF.Close()
	o, _ := os.ReadFile(outF.Name())
	e, _ := os.ReadFile(errF.Name())
	return code, string(o), string(e)
}

func aggRoundFiles(tb testing.TB, round string) []string {
	tb.Helper()
	files, _ := filepath.Glob(filepath.Join(aggFixtures, round, "leaf*.npy"))
	if len(files) == 0 {
		tb.Fatal("no fixtures")
	}
	return files
}

func aggRead(tb testing.TB, path string) *weights.Update {
	tb.Helper()
	u, err := weights.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	return u
}

// aggAssertNear fails unless a and b have the same tensors and values within
// a relative tol.
func aggAssertNear(tb testing.TB, got, want *weights.Update, tol float64) {
	tb.Helper()
	if got.NumSamples != want.NumSamples {
		tb.Fatalf("num_samples %d, want %d", got.NumSamples, want.NumSamples)
	}
	if s := weights.Compare(want.Tensors, got.Tensors); s != "" {
		tb.Fatal(s)
	}
	for k := range want.Tensors {
		g, w := &got.Tensors[k], &want.Tensors[k]
		if g.DType != w.DType {
			tb.Fatalf("tensor %d: dtype %s, want %s", k, g.DType, w.DType)
		}
		gv, wv := make([]float64, g.Len()), make([]float64, w.Len())
		g.DType.ToFloat64(gv, g.Data)
		w.DType.ToFloat64(wv, w.Data)
		for i := range wv {
			if math.Abs(gv[i]-wv[i]) > tol*math.Max(1, math.Abs(wv[i])) {
				tb.Fatalf("tensor %d [%d] = %v, want %v", k, i, gv[i], wv[i])
			}
		}
	}
}

func TestAggregateCommand(t *testing.T) {
	t.Run("OK", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "out.npy")
		code, stdout, stderr := aggRun(t, append([]string{"aggregate", "-o", out}, aggRoundFiles(t, "round_0")...)...)
		if code != 0 {
			t.Fatalf("exit %d: %s", code, stderr)
		}
		for _, w := range []string{"fedavg (blocked) of 3 updates", "num_samples=3663", "seconds=", "GB/s="} {
			if !strings.Contains(stdout, w) {
				t.Fatalf("summary %q lacks %q", stdout, w)
			}
		}
		if strings.Count(stdout, "\n") != 1 {
			t.Fatalf("summary is not one line: %q", stdout)
		}
		aggAssertNear(t, aggRead(t, out), aggRead(t, filepath.Join(aggFixtures, "round_0", "fedavg.npy")), 1e-6)
	})
	t.Run("JSON", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "out.npy")
		code, stdout, stderr := aggRun(t, append([]string{"aggregate", "--json", "--strategy", "trimmed-mean", "--trim", "0.25", "-o", out}, aggRoundFiles(t, "round_1")...)...)
		if code != 0 {
			t.Fatalf("exit %d: %s", code, stderr)
		}
		var s aggregateSummary
		if err := json.Unmarshal([]byte(stdout), &s); err != nil {
			t.Fatalf("%v: %q", err, stdout)
		}
		if s.UpdatesUsed != 5 || s.NumSamples != 12166 || s.Strategy != "trimmed-mean" || s.Mode != "blocked" || s.BytesRead == 0 || s.Output != out {
			t.Fatalf("summary %+v", s)
		}
	})
	t.Run("Incremental", func(t *testing.T) {
		dir := t.TempDir()
		a, b := filepath.Join(dir, "a.npy"), filepath.Join(dir, "b.npy")
		files := aggRoundFiles(t, "round_2")
		if code, _, stderr := aggRun(t, append([]string{"aggregate", "-o", a}, files...)...); code != 0 {
			t.Fatal(stderr)
		}
		code, stdout, stderr := aggRun(t, append([]string{"aggregate", "--incremental", "-o", b}, files...)...)
		if code != 0 || !strings.Contains(stdout, "(incremental)") {
			t.Fatalf("exit %d: %s %s", code, stdout, stderr)
		}
		ab, _ := os.ReadFile(a)
		bb, _ := os.ReadFile(b)
		if string(ab) != string(bb) {
			t.Fatal("incremental and blocked outputs differ")
		}
	})
	t.Run("NoSync", func(t *testing.T) {
		dir := t.TempDir()
		a, b := filepath.Join(dir, "a.npy"), filepath.Join(dir, "b.npy")
		files := aggRoundFiles(t, "round_0")
		if code, _, stderr := aggRun(t, append([]string{"aggregate", "-o", a}, files...)...); code != 0 {
			t.Fatal(stderr)
		}
		if code, _, stderr := aggRun(t, append([]string{"aggregate", "--sync=false", "-o", b}, files...)...); code != 0 {
			t.Fatal(stderr)
		}
		ab, _ := os.ReadFile(a)
		bb, _ := os.ReadFile(b)
		if string(ab) != string(bb) {
			t.Fatal("--sync=false changed the output")
		}
		if left, _ := filepath.Glob(filepath.Join(dir, ".*")); len(left) != 0 {
			t.Fatalf("temporary files left: %v", left)
		}
	})
	t.Run("Sample", func(t *testing.T) {
		files := aggRoundFiles(t, "round_1")
		var used [][]string
		for range 2 {
			out := filepath.Join(t.TempDir(), "out.npy")
			code, stdout, stderr := aggRun(t, append([]string{"aggregate", "--json", "--sample", "2", "--seed", "7", "-o", out}, files...)...)
			if code != 0 {
				t.Fatal(stderr)
			}
			var s aggregateSummary
			if err := json.Unmarshal([]byte(stdout), &s); err != nil {
				t.Fatal(err)
			}
			used = append(used, s.Updates)
		}
		if len(used[0]) != 2 || strings.Join(used[0], ",") != strings.Join(used[1], ",") {
			t.Fatalf("samples %v", used)
		}
		want := aggregate.Sample(len(files), 2, 7)
		if used[0][0] != files[want[0]] || used[0][1] != files[want[1]] {
			t.Fatalf("sampled %v, want indices %v of %v", used[0], want, files)
		}
	})
	t.Run("ServerOptimizerState", func(t *testing.T) {
		dir := t.TempDir()
		files := aggRoundFiles(t, "round_0")
		global := filepath.Join(aggFixtures, "round_0", "fedavg.npy")
		state := filepath.Join(dir, "state.npy")
		for round := int64(1); round <= 2; round++ {
			out := filepath.Join(dir, "out.npy")
			code, stdout, stderr := aggRun(t, append([]string{"aggregate", "--json", "--strategy", "fedadam", "--server-lr", "0.01", "--global", global, "--state", state, "-o", out}, files...)...)
			if code != 0 {
				t.Fatal(stderr)
			}
			var s aggregateSummary
			if err := json.Unmarshal([]byte(stdout), &s); err != nil {
				t.Fatal(err)
			}
			if s.StateRound != round {
				t.Fatalf("round %d: state round %d", round, s.StateRound)
			}
			st := aggRead(t, state)
			if st.NumSamples != round || weights.FormatShape(st.Tensors[0].Shape) != "(6, 4, 2)" {
				t.Fatalf("state: num_samples %d, shape %s", st.NumSamples, st.Tensors[0].ShapeString())
			}
		}
	})
	t.Run("ErrMismatch", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "out.npy")
		files := append(aggRoundFiles(t, "round_0"), filepath.Join(aggFixtures, "round_0_mismatch.npy"))
		code, _, stderr := aggRun(t, append([]string{"aggregate", "-o", out}, files...)...)
		if code != 1 || !strings.Contains(stderr, "round_0_mismatch.npy: tensor 0 has shape (6, 5), the first update's is (6, 4)") {
			t.Fatalf("exit %d: %s", code, stderr)
		}
		if _, err := os.Stat(out); !os.IsNotExist(err) {
			t.Fatal("a failed run left an output file")
		}
		left, _ := filepath.Glob(filepath.Join(filepath.Dir(out), "*"))
		if len(left) != 0 {
			t.Fatalf("temporary files left: %v", left)
		}
	})
	t.Run("ErrNaN", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "out.npy")
		code, _, stderr := aggRun(t, "aggregate", "-o", out, filepath.Join(aggFixtures, "bad_nan.npy"))
		if code != 1 || !strings.Contains(stderr, "NaN") {
			t.Fatalf("exit %d: %s", code, stderr)
		}
		if code, _, stderr := aggRun(t, "aggregate", "--allow-non-finite", "-o", out, filepath.Join(aggFixtures, "bad_nan.npy")); code != 0 {
			t.Fatalf("allowed: exit %d: %s", code, stderr)
		}
	})
	t.Run("ErrOptions", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "out.npy")
		files := aggRoundFiles(t, "round_0")
		for _, tc := range []struct {
			args []string
			want string
		}{
			{[]string{"--strategy", "trimmed-mean", "--trim", "0.7"}, "trimmed-mean: --trim must be in [0, 0.5), got 0.7"},
			{[]string{"--trim", "0.2"}, "fedavg: unknown option --trim"},
			{[]string{"--strategy", "nope"}, `unknown strategy "nope"`},
			{[]string{"--strategy", "fedadam"}, "fedadam needs the previous global model: --global FILE"},
			{[]string{"--strategy", "krum", "--byzantine", "1"}, "krum: --byzantine 1 needs more than 2F+2 = 4 updates, got 3"},
			{[]string{"--sample", "9"}, "--sample 9 is more than the 3 files"},
		} {
			code, _, stderr := aggRun(t, append(append(append([]string{"aggregate"}, tc.args...), "-o", out), files...)...)
			if code != 2 || !strings.Contains(stderr, tc.want) {
				t.Errorf("%v: exit %d: %q, want %q", tc.args, code, stderr, tc.want)
			}
		}
	})
	t.Run("Help", func(t *testing.T) {
		code, stdout, _ := aggRun(t, "aggregate", "--help")
		if code != 0 {
			t.Fatal(code)
		}
		for _, s := range aggregate.Strategies() {
			if !strings.Contains(stdout, "\n  "+string(s.Name)+"\n") {
				t.Errorf("help lacks %s", s.Name)
			}
		}
	})
}

// aggNumpyRound makes updates with numpy (float32, float16, float64 and an
// int64 counter), averages them as Python FL servers do in float64, and
// writes the reference.
const aggNumpyRound = `
import sys, numpy as np
out = sys.argv[1]
rng = np.random.default_rng(11)
shapes = [((16, 8, 3, 3), np.float32), ((16,), np.float16), ((7, 5), np.float64), ((), np.int64)]
ups = []
for j in range(6):
    ps = []
    for shape, dt in shapes:
        if dt == np.int64:
            ps.append(np.array(rng.integers(0, 1000), dtype=dt))
        else:
            ps.append(rng.standard_normal(shape).astype(dt))
    n = int(rng.integers(1, 5000))
    arr = np.empty(2, dtype=object); arr[0] = n; arr[1] = ps
    np.save(f"{out}/leaf{j}.npy", arr, allow_pickle=True)
    ups.append((n, ps))
total = sum(n for n, _ in ups)
acc = [np.zeros(p.shape, np.float64) for p in ups[0][1]]
for n, ps in ups:
    for a, p in zip(acc, ps):
        a += n * p.astype(np.float64)
res = []
for a, p in zip(acc, ups[0][1]):
    m = np.asarray(a / total)
    res.append(np.asarray(np.rint(m).astype(p.dtype) if p.dtype.kind in "iu" else m.astype(p.dtype)))
arr = np.empty(2, dtype=object); arr[0] = total; arr[1] = res
np.save(f"{out}/want.npy", arr, allow_pickle=True)
`

// TestAggregateNumpy checks the command against numpy on updates numpy
// made, and checks that numpy loads the command's output.
func TestAggregateNumpy(t *testing.T) {
	py := os.Getenv("BRANCHKEY_TEST_PYTHON")
	if py == "" {
		t.Skip("BRANCHKEY_TEST_PYTHON is not set (e.g. /usr/bin/python3 with numpy)")
	}
	dir := t.TempDir()
	if b, err := exec.Command(py, "-c", aggNumpyRound, dir).CombinedOutput(); err != nil {
		t.Fatalf("numpy: %v\n%s", err, b)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "leaf*.npy"))
	out := filepath.Join(dir, "out.npy")
	if code, _, stderr := aggRun(t, append([]string{"aggregate", "-o", out}, files...)...); code != 0 {
		t.Fatal(stderr)
	}
	// Within one float16 rounding (the float32 and float64 tensors come
	// out within their own, far smaller).
	aggAssertNear(t, aggRead(t, out), aggRead(t, filepath.Join(dir, "want.npy")), 1e-3)
	check := `
import sys, numpy as np
a = np.load(sys.argv[1], allow_pickle=True); b = np.load(sys.argv[2], allow_pickle=True)
assert a.shape == (2,) and type(a[0]) is int and type(a[1]) is list and a[0] == b[0]
for x, y in zip(a[1], b[1]):
    assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, y.dtype, x.shape, y.shape)
    tol = {2: 1e-3, 4: 1e-6, 8: 1e-12}[x.dtype.itemsize] if x.dtype.kind == "f" else 0
    assert np.allclose(x.astype(np.float64), y.astype(np.float64), rtol=tol, atol=tol), (x, y)
print("ok")
`
	if b, err := exec.Command(py, "-c", check, out, filepath.Join(dir, "want.npy")).CombinedOutput(); err != nil || !strings.Contains(string(b), "ok") {
		t.Fatalf("numpy check: %v\n%s", err, b)
	}
}
