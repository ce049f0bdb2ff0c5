package aggregate_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"testing"
	"time"

	"github.com/branchkey/branchkey/aggregate"
	"github.com/branchkey/branchkey/weights"
)

// peakMemory samples the Go runtime's resident memory (everything it has
// mapped, less the heap it returned to the OS) every millisecond until stop
// is called, which returns the largest sample.
func peakMemory() (stop func() uint64, base uint64) {
	samples := []metrics.Sample{{Name: "/memory/classes/total:bytes"}, {Name: "/memory/classes/heap/released:bytes"}}
	read := func() uint64 {
		metrics.Read(samples)
		return samples[0].Value.Uint64() - samples[1].Value.Uint64()
	}
	base = read()
	var (
		mu   sync.Mutex
		peak = base
		done = make(chan struct{})
		wg   sync.WaitGroup
	)
	wg.Go(func() {
		t := time.NewTicker(time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				m := read()
				mu.Lock()
				peak = max(peak, m)
				mu.Unlock()
			}
		}
	})
	return func() uint64 {
		close(done)
		wg.Wait()
		return max(peak, read())
	}, base
}

// TestMemoryBlocked checks the blocked path's memory bound: FedAvg over 50
// updates of 4M float32 parameters (16 MiB each, 800 MiB in all) stays
// under 1.5 times one model plus 64 MiB of Go memory, as the runtime's own
// metrics measure it.
func TestMemoryBlocked(t *testing.T) {
	const (
		updates = 50
		params  = 4 << 20
	)
	dir := t.TempDir()
	// One model's bytes, shared by the updates, which differ in
	// num_samples: the memory bound concerns the engine, not the data.
	data := make([]byte, 4*params)
	for i := 0; i < params; i++ {
		binary.LittleEndian.PutUint32(data[4*i:], math.Float32bits(float32(i%1000)/1000))
	}
	sizes := []int{params - 3000, 2000, 1000}
	var ts []weights.Tensor
	off := 0
	for _, n := range sizes {
		ts = append(ts, weights.Tensor{DType: weights.Float32, Shape: []int{n}, Data: data[4*off : 4*(off+n)]})
		off += n
	}
	var inputs []aggregate.Input
	for j := range updates {
		p := filepath.Join(dir, fmt.Sprintf("leaf%02d.npy", j))
		if err := weights.WriteFile(p, update(int64(j+1), ts...)); err != nil {
			t.Fatal(err)
		}
		inputs = append(inputs, MustFileInput(t, p))
	}
	out, err := os.Create(filepath.Join(dir, "out.npy"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	model := uint64(4 * params)
	data, ts = nil, nil
	debug.FreeOSMemory()

	stop, base := peakMemory()
	res, err := aggregate.Aggregate(context.Background(), MustConfig(t, "fedavg", nil), inputs, out)
	peak := stop()
	if err != nil {
		t.Fatal(err)
	}
	limit := model*3/2 + 64<<20
	t.Logf("blocked fedavg of %d x %d params: peak Go memory %.1f MiB, %.1f MiB before (limit %.1f MiB, one model %.1f MiB); %d bytes read in %v",
		updates, params, float64(peak)/(1<<20), float64(base)/(1<<20), float64(limit)/(1<<20), float64(model)/(1<<20), res.BytesRead, res.Duration)
	if peak > limit {
		t.Fatalf("peak memory %d bytes, over the limit of %d", peak, limit)
	}
	if res.NumSamples != updates*(updates+1)/2 {
		t.Fatalf("num_samples %d", res.NumSamples)
	}
}
