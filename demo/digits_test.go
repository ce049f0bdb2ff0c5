package demo_test

import (
	"testing"

	"github.com/branchkey/branchkey/demo"
)

// MustLoadDigits returns the embedded digits or fails the test.
func MustLoadDigits(tb testing.TB) []demo.Sample {
	tb.Helper()
	samples, err := demo.LoadDigits()
	if err != nil {
		tb.Fatal(err)
	}
	return samples
}

func TestLoadDigits(t *testing.T) {
	samples := MustLoadDigits(t)
	if len(samples) != 1797 {
		t.Fatalf("got %d samples, want 1797", len(samples))
	}

	// Class sizes as scikit-learn documents them for load_digits.
	want := [demo.NumClasses]int{178, 182, 177, 183, 181, 182, 181, 179, 174, 180}
	var got [demo.NumClasses]int
	for i, s := range samples {
		got[s.Label]++
		for j, v := range s.Features {
			if v < 0 || v > 1 {
				t.Fatalf("sample %d feature %d is %v, want it scaled into [0, 1]", i, j, v)
			}
		}
	}
	if got != want {
		t.Errorf("class sizes %v, want %v", got, want)
	}

	// The first line of the file is a zero starting 0,0,5,13,9,1,0,0.
	first := samples[0]
	if first.Label != 0 || first.Features[2] != 5.0/16 || first.Features[3] != 13.0/16 {
		t.Errorf("first sample is label %d, pixels %v, want a 0 starting 0 0 5/16 13/16", first.Label, first.Features[:4])
	}
}
