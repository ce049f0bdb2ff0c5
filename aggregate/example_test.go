package aggregate_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/branchkey/branchkey/aggregate"
)

// openInputs opens weights files as inputs; the caller closes the files.
func openInputs(paths []string) ([]aggregate.Input, []*os.File) {
	var ins []aggregate.Input
	var files []*os.File
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			panic(err)
		}
		fi, _ := f.Stat()
		ins = append(ins, aggregate.Input{Name: filepath.Base(p), R: f, Size: fi.Size()})
		files = append(files, f)
	}
	return ins, files
}

// A round aggregated from its stored updates, as a policy's strategy and
// options name it.
func ExampleAggregate() {
	paths, _ := filepath.Glob("../testdata/fixtures/round_1/leaf*.npy")
	inputs, files := openInputs(paths)
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	cfg, err := aggregate.ParseConfig("trimmed-mean", map[string]string{"trim": "0.2"})
	if err != nil {
		fmt.Println(err)
		return
	}
	res, err := aggregate.Aggregate(context.Background(), cfg, inputs, io.Discard)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(res.Strategy, res.Mode, len(res.Updates), "updates,", res.NumSamples, "samples,", res.Params, "parameters")

	_, err = aggregate.ParseConfig("trimmed-mean", map[string]string{"trim": "0.7"})
	fmt.Println(err)
	// Output:
	// trimmed-mean blocked 5 updates, 12166 samples, 46 parameters
	// trimmed-mean: --trim must be in [0, 0.5), got 0.7
}

// A round folded update by update as uploads arrive.
func ExampleAccumulator() {
	ctx := context.Background()
	paths, _ := filepath.Glob("../testdata/fixtures/round_0/leaf*.npy")
	paths = append(paths, "../testdata/fixtures/round_0_mismatch.npy")
	inputs, files := openInputs(paths)
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	acc, err := aggregate.NewAccumulator(ctx, aggregate.Config{Strategy: aggregate.FedAvg})
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, in := range inputs {
		if err := acc.Add(ctx, in); err != nil {
			fmt.Println("refused:", err) // an HTTP 400 in the server
		}
	}
	fmt.Println("holds", acc.Inputs())
	res, err := acc.WriteAggregate(ctx, io.Discard)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(res.Mode, res.NumSamples, "samples")
	// Output:
	// refused: update round_0_mismatch.npy: tensor 0 has shape (6, 5), the first update's is (6, 4)
	// holds [leaf0.npy leaf1.npy leaf2.npy]
	// incremental 3663 samples
}
