package weights_test

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/branchkey/branchkey/weights"
)

const fixtures = "../testdata/fixtures"

type expectFile struct {
	NumSamples int64 `json:"num_samples"`
	Params     []struct {
		DType   string `json:"dtype"`
		Shape   []int  `json:"shape"`
		Fortran bool   `json:"fortran"`
	} `json:"params"`
}

// decodeAll reads a file every way the package offers and checks the ways
// agree with each other: same structure, Index offsets pointing at the bytes
// Decode returned, Scan's chunks adding up to them.
func decodeAll(t *testing.T, path string) (*weights.Update, error) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	full, err := weights.ReadFile(path)
	stream, err2 := weights.Decode(bytes.NewReader(b))
	idx, err3 := weights.Index(bytes.NewReader(b), int64(len(b)))
	var scanned [][]byte
	scan, err4 := weights.Scan(iotest{bytes.NewReader(b)}, func(i int, tn *weights.Tensor, chunk []byte) error {
		for len(scanned) <= i {
			scanned = append(scanned, []byte{})
		}
		if len(chunk)%tn.DType.Size != 0 {
			t.Errorf("%s: tensor %d: chunk of %d bytes is not whole elements", path, i, len(chunk))
		}
		scanned[i] = append(scanned[i], chunk...)
		return nil
	})
	errs := []error{err, err2, err3, err4}
	for i, e := range errs {
		if (e == nil) != (err == nil) {
			t.Fatalf("%s: decode modes disagree: ReadFile=%v, Decode/Index/Scan[%d]=%v", path, err, i, e)
		}
	}
	if err != nil {
		return nil, err
	}
	for _, u := range []*weights.Update{stream, idx, scan} {
		if u.Signature() != full.Signature() || u.NumSamples != full.NumSamples || u.Size != int64(len(b)) {
			t.Fatalf("%s: modes disagree: %q/%d/%d vs %q/%d/%d", path, u.Signature(), u.NumSamples, u.Size, full.Signature(), full.NumSamples, len(b))
		}
	}
	for i := range full.Tensors {
		tn := &full.Tensors[i]
		if !bytes.Equal(stream.Tensors[i].Data, tn.Data) {
			t.Fatalf("%s: tensor %d: Decode and ReadFile data differ", path, i)
		}
		if idx.Tensors[i].Data != nil {
			t.Fatalf("%s: tensor %d: Index copied data", path, i)
		}
		off := idx.Tensors[i].Offset
		if !bytes.Equal(b[off:off+tn.NBytes()], tn.Data) {
			t.Fatalf("%s: tensor %d: Index offset %d does not point at the data", path, i, off)
		}
		if tn.NBytes() > 0 && !bytes.Equal(scanned[i], tn.Data) {
			t.Fatalf("%s: tensor %d: Scan passed different bytes", path, i)
		}
	}
	return full, nil
}

// iotest hides io.Seeker/ReaderAt so Scan sees a plain stream.
type iotest struct{ r io.Reader }

func (r iotest) Read(p []byte) (int, error) {
	if len(p) > 7777 { // odd read sizes, to cross chunk boundaries
		p = p[:7777]
	}
	return r.r.Read(p)
}

func TestFixtures(t *testing.T) {
	t.Run("OK", func(t *testing.T) {
		files, _ := filepath.Glob(filepath.Join(fixtures, "ok_*.npy"))
		if len(files) < 9 {
			t.Fatalf("found %d ok fixtures", len(files))
		}
		for _, f := range files {
			t.Run(filepath.Base(f), func(t *testing.T) {
				var want expectFile
				b, err := os.ReadFile(strings.TrimSuffix(f, ".npy") + ".expect.json")
				if err != nil {
					t.Fatal(err)
				}
				if err := json.Unmarshal(b, &want); err != nil {
					t.Fatal(err)
				}
				u, err := decodeAll(t, f)
				if err != nil {
					t.Fatal(err)
				}
				if u.NumSamples != want.NumSamples {
					t.Errorf("num_samples %d, want %d", u.NumSamples, want.NumSamples)
				}
				if len(u.Tensors) != len(want.Params) {
					t.Fatalf("%d tensors, want %d", len(u.Tensors), len(want.Params))
				}
				for i, p := range want.Params {
					tn := u.Tensors[i]
					if tn.DType.String() != p.DType || fmt.Sprint(tn.Shape) != fmt.Sprint(p.Shape) || tn.Fortran != p.Fortran {
						t.Errorf("tensor %d: %s %v fortran=%v, want %s %v fortran=%v", i, tn.DType, tn.Shape, tn.Fortran, p.DType, p.Shape, p.Fortran)
					}
				}
			})
		}
	})

	t.Run("Bad", func(t *testing.T) {
		var index map[string]string
		b, err := os.ReadFile(filepath.Join(fixtures, "bad_index.json"))
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(b, &index); err != nil {
			t.Fatal(err)
		}
		// What each error must say, in its own words.
		says := map[string]string{
			"bad_empty_params.npy":       "parameter list is empty",
			"bad_exec_os_system.npy":     "global posix.system is not allowed",
			"bad_float_samples.npy":      "num_samples is 3.5, a float",
			"bad_huge_length_claim.npy":  "opcode BINBYTES at byte",
			"bad_magic.npy":              "not an npy file",
			"bad_negative_samples.npy":   "num_samples is -4; it must be positive",
			"bad_object_param.npy":       "parameter 0 has dtype object",
			"bad_plain_array.npy":        "dtype <f4 and shape (3, 3)",
			"bad_string_param.npy":       "parameter 0 is a str",
			"bad_three_elements.npy":     "shape (3,)",
			"bad_truncated.npy":          "file ends early",
			"bad_tuple_params.npy":       "second element is a tuple; it must be a list",
			"bad_zero_samples.npy":       "num_samples is 0",
			"bad_nan.npy":                "", // well-formed; NaN is the branch's policy
			"bad_huge_length_claim.npy ": "",
		}
		for name := range index {
			t.Run(name, func(t *testing.T) {
				want, ok := says[name]
				if !ok {
					t.Fatalf("no expectation for new fixture %s (%s)", name, index[name])
				}
				u, err := decodeAll(t, filepath.Join(fixtures, name))
				if name == "bad_nan.npy" {
					if err != nil {
						t.Fatal(err)
					}
					tn := u.Tensors[0]
					if i := tn.DType.NonFinite(tn.Data); i != 1 {
						t.Fatalf("NonFinite = %d, want 1", i)
					}
					return
				}
				if err == nil {
					t.Fatalf("decoded; want an error saying %q", want)
				}
				if !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), name) {
					t.Fatalf("error %q does not name the file and say %q", err, want)
				}
				if weights.AsError(err) == nil {
					t.Fatalf("error %v is not a *weights.Error", err)
				}
			})
		}
	})

	t.Run("Rounds", func(t *testing.T) {
		files, _ := filepath.Glob(filepath.Join(fixtures, "round_*", "*.npy"))
		for _, f := range append(files, filepath.Join(fixtures, "round_0_mismatch.npy")) {
			if _, err := decodeAll(t, f); err != nil {
				t.Error(err)
			}
		}
	})
}

// TestEncodeIdentical re-encodes every numpy-made fixture and expects the
// very bytes np.save wrote.
func TestEncodeIdentical(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join(fixtures, "ok_*.npy"))
	more, _ := filepath.Glob(filepath.Join(fixtures, "round_*", "*.npy"))
	for _, f := range append(files, more...) {
		if strings.HasSuffix(f, "ok_npy_v2.npy") {
			continue // written with a forced 2.0 header; we write 1.0 as np.save does
		}
		u, err := weights.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var b bytes.Buffer
		if err := weights.Encode(&b, u); err != nil {
			t.Fatal(err)
		}
		orig, _ := os.ReadFile(f)
		if !bytes.Equal(orig, b.Bytes()) {
			t.Errorf("%s: encoding differs from numpy's (%d vs %d bytes)", f, b.Len(), len(orig))
		}
	}
}

func python(t *testing.T) string {
	t.Helper()
	py := os.Getenv("BRANCHKEY_TEST_PYTHON")
	if py == "" {
		t.Skip("BRANCHKEY_TEST_PYTHON is unset (set it to /usr/bin/python3 with numpy)")
	}
	return py
}

// TestNumpyRoundTrip: numpy writes, we decode and re-encode to the same bytes;
// we write, numpy loads, and every tensor's bytes are compared exactly.
func TestNumpyRoundTrip(t *testing.T) {
	py := python(t)
	dir := t.TempDir()
	if out, err := exec.Command(py, "testdata/numpy_roundtrip.py", "make", dir).CombinedOutput(); err != nil {
		t.Fatalf("numpy make: %v\n%s", err, out)
	}
	var manifest map[string]json.RawMessage
	b, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &manifest); err != nil {
		t.Fatal(err)
	}
	type tensorDesc struct {
		DType   string `json:"dtype"`
		Shape   []int  `json:"shape"`
		Fortran bool   `json:"fortran"`
		Hex     string `json:"hex"`
	}
	for name, raw := range manifest {
		t.Run("FromNumpy/"+name, func(t *testing.T) {
			var want struct {
				NumSamples int64        `json:"num_samples"`
				Tensors    []tensorDesc `json:"tensors"`
			}
			if err := json.Unmarshal(raw, &want); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, name+".npy")
			u, err := decodeAll(t, path)
			if err != nil {
				t.Fatal(err)
			}
			if u.NumSamples != want.NumSamples || len(u.Tensors) != len(want.Tensors) {
				t.Fatalf("num_samples %d, %d tensors; numpy wrote %d, %d", u.NumSamples, len(u.Tensors), want.NumSamples, len(want.Tensors))
			}
			for i, w := range want.Tensors {
				tn := u.Tensors[i]
				if tn.DType.String() != w.DType || fmt.Sprint(tn.Shape) != fmt.Sprint(w.Shape) || tn.Fortran != w.Fortran || hex.EncodeToString(tn.Data) != w.Hex {
					t.Fatalf("tensor %d: %s %v %v differs from numpy's %s %v %v", i, tn.DType, tn.Shape, tn.Fortran, w.DType, w.Shape, w.Fortran)
				}
			}
			var enc bytes.Buffer
			if err := weights.Encode(&enc, u); err != nil {
				t.Fatal(err)
			}
			orig, _ := os.ReadFile(path)
			if !bytes.Equal(enc.Bytes(), orig) {
				t.Errorf("re-encoding differs from np.save's bytes (%d vs %d)", enc.Len(), len(orig))
			}
		})
	}
	t.Run("ToNumpy", func(t *testing.T) {
		u := &weights.Update{NumSamples: 1 << 33}
		add := func(dt weights.DType, shape []int, fortran bool) {
			tn := weights.Tensor{DType: dt, Shape: shape, Fortran: fortran}
			tn.Data = make([]byte, tn.NBytes())
			for i := range tn.Data {
				tn.Data[i] = byte(i*31 + len(u.Tensors)*7)
			}
			if dt.IsFloat() { // keep the bytes finite and exact: build from values
				vals := make([]float64, tn.Len())
				for i := range vals {
					vals[i] = float64(i-3) * 0.37 * float64(len(u.Tensors)+1)
				}
				dt.FromFloat64(tn.Data, vals)
			}
			if dt.Kind == 'b' {
				for i := range tn.Data {
					tn.Data[i] &= 1
				}
			}
			u.Tensors = append(u.Tensors, tn)
		}
		for _, dt := range []weights.DType{weights.Float16, weights.Float32, weights.Float64, weights.Int8, weights.Int16,
			weights.Int32, weights.Int64, weights.Uint8, weights.Uint16, weights.Uint32, weights.Uint64, weights.Bool} {
			add(dt, []int{3, 2}, false)
			be := dt
			be.BigEndian = dt.Size > 1
			add(be, []int{4}, false)
		}
		add(weights.Float32, []int{2, 3, 4}, true)
		add(weights.Float32, nil, false)
		add(weights.Float64, []int{0, 5}, false)
		add(weights.Float32, []int{1000}, false)
		for i := 0; i < 300; i++ { // past 256 memo entries
			add(weights.Float32, []int{i%3 + 1}, false)
		}
		path := filepath.Join(dir, "from_go.npy")
		if err := weights.WriteFile(path, u); err != nil {
			t.Fatal(err)
		}
		desc := map[string]any{"num_samples": u.NumSamples}
		var ts []tensorDesc
		for _, tn := range u.Tensors {
			shape := tn.Shape
			if shape == nil {
				shape = []int{}
			}
			// numpy's unpickler byte-swaps big-endian arrays into native
			// order, so numpy sees them little-endian with the same values.
			le := append([]byte{}, tn.Data...)
			if tn.DType.BigEndian {
				for k := 0; k < len(le); k += tn.DType.Size {
					slices.Reverse(le[k : k+tn.DType.Size])
				}
			}
			ts = append(ts, tensorDesc{DType: tn.DType.Native().String(), Shape: shape, Fortran: tn.Fortran, Hex: hex.EncodeToString(le)})
		}
		desc["tensors"] = ts
		mb, _ := json.Marshal(desc)
		mpath := filepath.Join(dir, "from_go.json")
		if err := os.WriteFile(mpath, mb, 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(py, "testdata/numpy_roundtrip.py", "check", path, mpath).CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != "ok" {
			t.Fatalf("numpy check: %v\n%s", err, out)
		}
	})
}

// pickle builds hostile files by hand.
func npyWith(pickle []byte) []byte {
	var b bytes.Buffer
	u := &weights.Update{NumSamples: 1, Tensors: []weights.Tensor{{DType: weights.Float32, Shape: []int{1}, Data: make([]byte, 4)}}}
	if err := weights.Encode(&b, u); err != nil {
		panic(err)
	}
	h := b.Bytes()[:128] // the header np.save writes for an update
	return append(append([]byte{}, h...), pickle...)
}

func TestHostile(t *testing.T) {
	// The prefix of a valid update pickle up to the first tensor's state,
	// taken from a real file so the cases below change one thing each.
	good, err := os.ReadFile(filepath.Join(fixtures, "ok_one_sample.npy"))
	if err != nil {
		t.Fatal(err)
	}
	// Offset of the tensor's SHORT_BINBYTES opcode: 16 bytes of float32 data.
	dataAt := bytes.Index(good, []byte{'C', 16})
	if dataAt < 0 {
		t.Fatal("no SHORT_BINBYTES in ok_one_sample.npy")
	}
	shapeAt := bytes.LastIndex(good[:dataAt], []byte{'K', 2, 'K', 2, 0x86}) // BININT1 2 BININT1 2 TUPLE2
	if shapeAt < 0 {
		t.Fatal("no (2, 2) shape tuple in ok_one_sample.npy")
	}
	replace := func(at, n int, with []byte) []byte {
		return append(append(append([]byte{}, good[:at]...), with...), good[at+n:]...)
	}
	huge := []byte{'J', 0, 0, 0, 0x40, 'J', 0, 0, 0, 0x40} // (2^30, 2^30) elements
	cases := []struct {
		name string
		data []byte
		says string
	}{
		{"ErrHugeShapeSmallData", replace(shapeAt, 4, huge), "needs 4611686018427387904 bytes, the data has 16"},
		{"ErrEmptyInput", nil, "not an npy file"},
		{"ErrVersion", append([]byte("\x93NUMPY\x04\x00"), good[8:]...), "unsupported npy format version 4.0"},
		{"ErrHeaderClaim", append([]byte("\x93NUMPY\x02\x00\xff\xff\xff\x7f"), good[10:]...), "npy header claims"},
		{"ErrUnknownOpcode", npyWith([]byte{0x80, 3, 'i'}), "opcode 0x69 ('i')"},
		{"ErrStackGlobalEval", npyWith(append([]byte{0x80, 4, 0x8c, 8}, append([]byte("builtins"), append([]byte{0x8c, 4}, []byte("eval\x93.")...)...)...)), "global builtins.eval is not allowed"},
		{"ErrMemoMissing", npyWith([]byte{0x80, 3, 'j', 0xff, 0xff, 0xff, 0xff, '.'}), "memo index 4294967295 was never stored"},
		{"ErrDeepMarks", npyWith(bytes.Repeat([]byte{'('}, 100)), "MARKs nested deeper than 64"},
		{"ErrLongString", npyWith([]byte{0x80, 3, 'X', 0, 0, 0, 1}), "a string of 16777216 bytes"},
		{"ErrBinBytes8Claim", npyWith([]byte{0x80, 4, 0x8e, 0, 0, 0, 0, 0, 1, 0, 0}), "claims 1099511627776 bytes"},
		{"ErrLoose", npyWith(append([]byte{0x80, 3, 'B', 100, 0, 0, 0}, make([]byte, 100)...)), "a bytes object of 100 bytes"},
		{"ErrReduceNotGlobal", npyWith([]byte{0x80, 3, 'K', 1, ')', 'R', '.'}), "REDUCE calls an int"},
		{"ErrStackUnderflow", npyWith([]byte{0x80, 3, 't'}), "no MARK on the stack"},
		{"ErrTrailing", append(append([]byte{}, good...), 0), "1 bytes after the end of the pickle"},
		{"ErrNoStop", good[:len(good)-1], "pickle stream ends early"},
		{"ErrComplex", bytes.Replace(good, []byte("X\x02\x00\x00\x00f4"), []byte("X\x02\x00\x00\x00c8"), 1), "dtype \"c8\" is not supported"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "x.npy")
			if err := os.WriteFile(path, c.data, 0o644); err != nil {
				t.Fatal(err)
			}
			_, err := decodeAll(t, path)
			if err == nil || !strings.Contains(err.Error(), c.says) {
				t.Fatalf("error %v, want one saying %q", err, c.says)
			}
		})
	}
}

// TestClaimAllocatesNothing: a 4 GiB BINBYTES claim in a short stream must
// not allocate 4 GiB, in any mode, even when the size is unknown.
func TestClaimAllocatesNothing(t *testing.T) {
	good, _ := os.ReadFile(filepath.Join(fixtures, "bad_huge_length_claim.npy"))
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	_, err := weights.Decode(iotest{bytes.NewReader(good)})
	runtime.ReadMemStats(&after)
	// A stream's length is unknown, so the claim is caught by the shape
	// check, before any byte of it is read.
	if err == nil || !strings.Contains(err.Error(), "needs 800 bytes, the data has 4294967280") {
		t.Fatalf("err = %v, want the claim refused", err)
	}
	if _, err := weights.DecodeAt(bytes.NewReader(good), int64(len(good))); !errors.Is(err, weights.ErrTruncated) {
		t.Fatalf("DecodeAt err = %v, want a truncation", err)
	}
	if got := after.TotalAlloc - before.TotalAlloc; got > 4<<20 {
		t.Fatalf("allocated %d bytes for a %d-byte file", got, len(good))
	}
}

func TestDTypeConversions(t *testing.T) {
	t.Run("Float16", func(t *testing.T) {
		for h := 0; h < 1<<16; h++ {
			v := weights.Float16Value(uint16(h))
			if v != v {
				continue
			}
			if got := weights.Float16Bits(v); got != uint16(h) && !(v == 0 && got&0x7fff == 0) {
				t.Fatalf("Float16Bits(Float16Value(%#04x) = %v) = %#04x", h, v, got)
			}
		}
		cases := []struct {
			v    float64
			want uint16
		}{
			{65504, 0x7bff}, {65519.99, 0x7bff}, {65520, 0x7c00}, {1e9, 0x7c00},
			{1 + 1.0/2048, 0x3c00}, {1 + 3.0/2048, 0x3c02}, // ties to even
			{5.960464477539063e-08, 0x0001}, {2.98023223876953125e-08, 0x0000}, {2.9802322387695312e-08 * 1.0001, 0x0001},
			{-2, 0xc000},
		}
		for _, c := range cases {
			if got := weights.Float16Bits(c.v); got != c.want {
				t.Errorf("Float16Bits(%v) = %#04x, want %#04x", c.v, got, c.want)
			}
		}
	})
	t.Run("BFloat16", func(t *testing.T) {
		if got := weights.BFloat16Bits(1); got != 0x3f80 {
			t.Errorf("BFloat16Bits(1) = %#04x", got)
		}
		if got := weights.BFloat16Bits(1 + 1.0/256); got != 0x3f80 { // tie to even
			t.Errorf("BFloat16Bits(1+2^-8) = %#04x", got)
		}
		if got := weights.BFloat16Bits(1 + 3.0/256); got != 0x3f82 {
			t.Errorf("BFloat16Bits(1+3*2^-8) = %#04x", got)
		}
	})
	t.Run("IntsRoundAndSaturate", func(t *testing.T) {
		b := make([]byte, 5*8)
		weights.Int64.FromFloat64(b, []float64{2.5, 3.5, -1.6, 1e30, -1e30})
		var got [5]float64
		weights.Int64.ToFloat64(got[:], b)
		want := [5]float64{2, 4, -2, 9.223372036854775807e18, -9.223372036854775808e18}
		if got != want {
			t.Errorf("int64 round trip %v, want %v", got, want)
		}
		u := make([]byte, 3)
		weights.Uint8.FromFloat64(u, []float64{-3, 255.6, 127.5})
		if !bytes.Equal(u, []byte{0, 255, 128}) {
			t.Errorf("uint8 %v", u)
		}
	})
}

// TestBFloat16 decodes and encodes the ml_dtypes.bfloat16 form by hand.
func TestBFloat16(t *testing.T) {
	u := &weights.Update{NumSamples: 3, Tensors: []weights.Tensor{{DType: weights.BFloat16, Shape: []int{2}, Data: []byte{0x80, 0x3f, 0x00, 0xc0}}}}
	var b bytes.Buffer
	if err := weights.Encode(&b, u); err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(b.Bytes(), []byte("cml_dtypes\nbfloat16\n")) {
		t.Fatal("bfloat16 is not pickled as ml_dtypes.bfloat16")
	}
	got, err := weights.Decode(&b)
	if err != nil {
		t.Fatal(err)
	}
	vals := make([]float64, 2)
	got.Tensors[0].DType.ToFloat64(vals, got.Tensors[0].Data)
	if got.Tensors[0].DType != weights.BFloat16 || vals[0] != 1 || vals[1] != -2 {
		t.Fatalf("got %v %v", got.Tensors[0].DType, vals)
	}
}

func TestCompare(t *testing.T) {
	a, _ := weights.ParseSignature("<f4(16, 8, 3, 3);<f4(16,);<i8()")
	cases := []struct{ sig, says string }{
		{"<f4(16, 8, 3, 3);<f4(16,);<i8()", ""},
		{">f8(16, 8, 3, 3);<f2(16,);<i4()", ""},
		{"<f4(16, 8, 5, 5);<f4(16,);<i8()", "tensor 0 has shape (16, 8, 5, 5), expected (16, 8, 3, 3)"},
		{"<f4(16, 8, 3, 3);<i4(16,);<i8()", "tensor 1 has dtype <i4, expected <f4"},
		{"<f4(16, 8, 3, 3);<f4(16,)", "has 2 tensors, expected 3"},
	}
	for _, c := range cases {
		b, err := weights.ParseSignature(c.sig)
		if err != nil {
			t.Fatal(err)
		}
		if got := weights.Compare(a, b); got != c.says {
			t.Errorf("Compare(%s) = %q, want %q", c.sig, got, c.says)
		}
	}
}

// TestWriteFileDevice: writing to /dev/null writes to the device and leaves
// it a device (an atomic rename over it would replace it with a file).
func TestWriteFileDevice(t *testing.T) {
	u := &weights.Update{NumSamples: 1, Tensors: []weights.Tensor{{DType: weights.Float32, Shape: []int{1}, Data: make([]byte, 4)}}}
	if err := weights.WriteFile(os.DevNull, u); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(os.DevNull)
	if err != nil || fi.Mode()&os.ModeDevice == 0 {
		t.Fatalf("%s is no longer a device: %v %v", os.DevNull, fi.Mode(), err)
	}
	path := filepath.Join(t.TempDir(), "u.npy")
	if err := weights.WriteFile(path, u); err != nil {
		t.Fatal(err)
	}
	if _, err := weights.ReadFile(path); err != nil {
		t.Fatal(err)
	}
	if err := weights.WriteFile(t.TempDir(), u); err == nil {
		t.Fatal("wrote over a directory")
	}
}
