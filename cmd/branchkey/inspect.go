package main

import (
	"encoding/json"
	"fmt"
	"io"

	"github.com/branchkey/branchkey/weights"
	"github.com/spf13/cobra"
)

func newInspectCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "inspect [--json] FILE...",
		Short: "Describe weights files: num_samples, tensors, dtypes and shapes",
		Long: `inspect reads each weights file's structure (without loading its tensors)
and prints num_samples, the tensor count, the total number of parameters and
each tensor's dtype and shape. With --json it prints one JSON object per file.
A file that is not a valid update is reported on stderr and makes the exit
status 1; the other files are still printed.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return inspect(cmd.OutOrStdout(), cmd.ErrOrStderr(), args, asJSON)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object per file")
	return cmd
}

// inspectTensor is one tensor in inspect's JSON output.
type inspectTensor struct {
	DType   string `json:"dtype"`
	Shape   []int  `json:"shape"`
	Fortran bool   `json:"fortran"`
	Params  int64  `json:"params"`
}

// inspectFile is one file in inspect's JSON output.
type inspectFile struct {
	File       string          `json:"file"`
	NumSamples int64           `json:"num_samples"`
	Params     int64           `json:"params"`
	Bytes      int64           `json:"bytes"`
	Tensors    []inspectTensor `json:"tensors"`
}

func inspect(stdout, stderr io.Writer, files []string, asJSON bool) error {
	failed := 0
	enc := json.NewEncoder(stdout)
	enc.SetEscapeHTML(false)
	for _, path := range files {
		u, err := weights.IndexFile(path)
		if err != nil {
			fmt.Fprintf(stderr, "branchkey: inspect: %v\n", err)
			failed++
			continue
		}
		out := inspectFile{File: path, NumSamples: u.NumSamples, Params: u.Params(), Bytes: u.Size, Tensors: []inspectTensor{}}
		for _, t := range u.Tensors {
			shape := t.Shape
			if shape == nil {
				shape = []int{}
			}
			out.Tensors = append(out.Tensors, inspectTensor{DType: t.DType.String(), Shape: shape, Fortran: t.Fortran, Params: t.Len()})
		}
		if asJSON {
			if err := enc.Encode(out); err != nil {
				return err
			}
			continue
		}
		fmt.Fprintf(stdout, "%s: num_samples=%d tensors=%d params=%d bytes=%d\n", path, u.NumSamples, len(u.Tensors), u.Params(), u.Size)
		for i, t := range out.Tensors {
			order := ""
			if t.Fortran {
				order = " fortran"
			}
			fmt.Fprintf(stdout, "  %4d  %-9s %-20s %12d%s\n", i, t.DType, weights.FormatShape(t.Shape), t.Params, order)
		}
	}
	if failed > 0 {
		return &exitError{code: 1, msg: fmt.Sprintf("%d of %d files are not valid updates", failed, len(files))}
	}
	return nil
}
