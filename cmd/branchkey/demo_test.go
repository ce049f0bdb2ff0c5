package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
)

// TestDemo runs "branchkey demo --leaves 3 --rounds 3 --json" and checks the
// global model learns: accuracy rises from the first round to the last and
// ends above 0.85.
func TestDemo(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := runIO(context.Background(), []string{"demo", "--leaves", "3", "--rounds", "3", "--json"}, &stdout, &stderr); code != 0 {
		t.Fatalf("demo exited %d:\n%s", code, stderr.String())
	}
	var rounds []demoRound
	sc := bufio.NewScanner(&stdout)
	for sc.Scan() {
		var r demoRound
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("stdout line %q is not a round: %v", sc.Text(), err)
		}
		rounds = append(rounds, r)
	}
	if len(rounds) != 3 {
		t.Fatalf("%d rounds reported, want 3:\n%s", len(rounds), stderr.String())
	}
	for i, r := range rounds {
		if r.Round != i+1 || r.Updates != 3 || r.Samples <= 0 || r.Aggregation == "" {
			t.Errorf("round %+v", r)
		}
	}
	first, last := rounds[0].Accuracy, rounds[2].Accuracy
	if last <= first || last < 0.85 {
		t.Fatalf("accuracy %v -> %v, want rising and >= 0.85", first, last)
	}
	if !strings.Contains(stderr.String(), "branchkey serve --data") {
		t.Errorf("the demo does not say how to serve its data:\n%s", stderr.String())
	}
}
