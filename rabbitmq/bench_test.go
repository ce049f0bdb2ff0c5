package rabbitmq_test

import (
	"context"
	"testing"

	"github.com/branchkey/branchkey"
)

// BenchmarkPublish measures confirmed publishes per second to a branch with
// one leaf queue: persistent messages to a durable queue, so each confirm
// waits for the broker's disk.
func BenchmarkPublish(b *testing.B) {
	br := MustBroker(b)
	tree := MustTree(b, br, nil)
	l := MustLeaf(b, br, tree, uniqueName("branch"))
	n := MustNotifier(b)
	m := newMessage(l, branchkey.MessageAggregationStatus, `{"aggregation_id":"0b8e4d1c-8a7c-4a4e-9a63-1f2d3c4b5a69","round":12,"num_samples":4096}`)
	mustPublish(b, n, m)
	ctx := context.Background()

	b.Run("Serial", func(b *testing.B) {
		for b.Loop() {
			if err := n.Publish(ctx, m); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
	})
	b.Run("Parallel", func(b *testing.B) {
		// 16 goroutines per CPU, as an outbox relay publishing a batch would.
		b.SetParallelism(16)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := n.Publish(ctx, m); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
	})
}
