package demo

import (
	"bufio"
	"bytes"
	"compress/gzip"
	_ "embed"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// NumFeatures is the number of inputs per sample, one per pixel of an 8x8
// image.
const NumFeatures = 64

// NumClasses is the number of labels: the digits 0 to 9.
const NumClasses = 10

// maxPixel is the largest raw pixel value: the count of set pixels in a 4x4
// block of the original 32x32 bitmap.
const maxPixel = 16

// digitsCSVGz is the UCI digits test set as shipped by scikit-learn: 1797
// lines of 64 pixel values and a label. Provenance in
// testdata/digits/README.md.
//
//go:embed digits.csv.gz
var digitsCSVGz []byte

// Sample is one labelled image.
type Sample struct {
	// Features are the 64 pixels in row-major order, scaled to [0, 1].
	Features [NumFeatures]float32
	// Label is the digit shown, 0 to 9.
	Label int
}

// LoadDigits returns the 1797 embedded digit images in file order, with
// pixels scaled to [0, 1]. It parses the embedded file on each call, so
// callers own the returned slice. An error means the embedded file is
// corrupt, which the package tests rule out.
func LoadDigits() ([]Sample, error) {
	zr, err := gzip.NewReader(bytes.NewReader(digitsCSVGz))
	if err != nil {
		return nil, fmt.Errorf("open embedded digits: %w", err)
	}
	samples, err := readDigits(zr)
	if err != nil {
		return nil, fmt.Errorf("read embedded digits: %w", err)
	}
	if err := zr.Close(); err != nil {
		return nil, fmt.Errorf("read embedded digits: %w", err)
	}
	return samples, nil
}

// readDigits parses CSV lines of 64 pixel values (0-16) followed by a label
// (0-9).
func readDigits(r io.Reader) ([]Sample, error) {
	var samples []Sample
	sc := bufio.NewScanner(r)
	for line := 1; sc.Scan(); line++ {
		text := strings.TrimSpace(sc.Text())
		if text == "" {
			continue
		}
		fields := strings.Split(text, ",")
		if len(fields) != NumFeatures+1 {
			return nil, fmt.Errorf("line %d has %d fields, want %d pixels and a label", line, len(fields), NumFeatures+1)
		}
		var s Sample
		for i, f := range fields {
			v, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil {
				return nil, fmt.Errorf("line %d field %d: %w", line, i+1, err)
			}
			if i == NumFeatures {
				if v < 0 || v >= NumClasses {
					return nil, fmt.Errorf("line %d has label %d, want 0 to %d", line, v, NumClasses-1)
				}
				s.Label = v
				continue
			}
			if v < 0 || v > maxPixel {
				return nil, fmt.Errorf("line %d pixel %d is %d, want 0 to %d", line, i, v, maxPixel)
			}
			s.Features[i] = float32(v) / maxPixel
		}
		samples = append(samples, s)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return samples, nil
}
