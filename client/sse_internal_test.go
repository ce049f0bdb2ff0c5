package client

import (
	"errors"
	"io"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// TestSSEReader pins the event stream parser to the HTML standard's
// examples and edge cases.
func TestSSEReader(t *testing.T) {
	for _, tc := range []struct {
		name   string
		stream string
		lastID string
		want   []sseEvent
		retry  time.Duration
	}{
		{"OK", "retry: 2000\n\nid: 7\nevent: aggregation_status\ndata: {\"a\":1}\n\n", "", []sseEvent{{ID: "7", Event: "aggregation_status", Data: `{"a":1}`}}, 2 * time.Second},
		{"MultiLineData", "data: a\ndata:b\ndata\n\n", "", []sseEvent{{Data: "a\nb\n"}}, 0},
		{"CRLF", "id: 1\r\ndata: x\r\n\r\nid: 2\rdata: y\r\r", "", []sseEvent{{ID: "1", Data: "x"}, {ID: "2", Data: "y"}}, 0},
		{"CommentsAndUnknown", ": ping\nfoo: bar\ndata: x\n\n", "5", []sseEvent{{ID: "5", Data: "x"}}, 0},
		{"IDCarriesOver", "id: 3\ndata: a\n\ndata: b\n\n", "", []sseEvent{{ID: "3", Data: "a"}, {ID: "3", Data: "b"}}, 0},
		{"IDWithNUL", "id: 3\x00\ndata: a\n\n", "2", []sseEvent{{ID: "2", Data: "a"}}, 0},
		{"NoData", "id: 4\nevent: x\n\ndata: y\n\n", "", []sseEvent{{ID: "4", Data: "y"}}, 0},
		{"Unfinished", "data: a\n\ndata: b", "", []sseEvent{{Data: "a"}}, 0},
		{"BOM", "\xEF\xBB\xBFdata: a\n\n", "", []sseEvent{{Data: "a"}}, 0},
		{"BadRetry", "retry: 2s\nretry: -1\ndata: a\n\n", "", []sseEvent{{Data: "a"}}, 0},
		{"HugeRetry", "retry: 99999999999\n\n", "", nil, maxSSERetry},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newSSEReader(strings.NewReader(tc.stream), tc.lastID)
			var got []sseEvent
			for {
				ev, err := r.Next()
				if errors.Is(err, io.EOF) {
					break
				} else if err != nil {
					t.Fatal(err)
				}
				got = append(got, ev)
			}
			if len(got) != len(tc.want) {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Errorf("event %d: got %q, want %q", i, got[i], tc.want[i])
				}
			}
			if r.retry != tc.retry {
				t.Errorf("retry %v, want %v", r.retry, tc.retry)
			}
		})
	}
	t.Run("ErrLongLine", func(t *testing.T) {
		r := newSSEReader(strings.NewReader("data: "+strings.Repeat("x", maxSSELine+1)+"\n\n"), "")
		if _, err := r.Next(); err == nil || errors.Is(err, io.EOF) {
			t.Fatalf("Next = %v", err)
		}
	})
}

// FuzzSSEReader feeds the parser arbitrary streams: it never panics, and
// every event it returns holds data from the stream and a valid last id.
func FuzzSSEReader(f *testing.F) {
	f.Add("retry: 2000\n\nid: 7\nevent: aggregation_status\ndata: {\"message_type\":\"aggregation_status\",\"body\":{\"aggregation_id\":\"x\"}}\n\n")
	f.Add("data: a\r\ndata: b\r\r\n: c\rid\n\n")
	f.Fuzz(func(t *testing.T, stream string) {
		r := newSSEReader(strings.NewReader(stream), "")
		for range 1000 {
			ev, err := r.Next()
			if err != nil {
				return
			}
			if strings.ContainsRune(ev.ID, 0) || len(ev.Data) > len(stream) {
				t.Fatalf("event %q from %q", ev, stream)
			}
			if utf8.ValidString(stream) && !utf8.ValidString(ev.Data) {
				t.Fatalf("invalid UTF-8 data %q from valid %q", ev.Data, stream)
			}
			n, err := parseNotification([]byte(ev.Data), ev.ID)
			if err == nil && n.Type == "" {
				t.Fatalf("notification without a type from %q", ev.Data)
			}
		}
	})
}

// FuzzParseContentRange checks the Content-Range parser never accepts a
// range that does not fit its size.
func FuzzParseContentRange(f *testing.F) {
	f.Add("bytes 100-199/200")
	f.Add("bytes 0-0/*")
	f.Fuzz(func(t *testing.T, v string) {
		start, size, ok := parseContentRange(v)
		if ok && (start < 0 || (size >= 0 && start >= size)) {
			t.Fatalf("%q: start %d size %d", v, start, size)
		}
	})
}

func TestParseContentRange(t *testing.T) {
	for _, tc := range []struct {
		v           string
		start, size int64
		ok          bool
	}{
		{"bytes 100-199/200", 100, 200, true},
		{"bytes 0-9/*", 0, -1, true},
		{"bytes 100-199/150", 0, 0, false},
		{"bytes */200", 0, 0, false},
		{"items 0-1/2", 0, 0, false},
		{"bytes 5-4/10", 0, 0, false},
	} {
		start, size, ok := parseContentRange(tc.v)
		if ok != tc.ok || (ok && (start != tc.start || size != tc.size)) {
			t.Errorf("%q: %d, %d, %v", tc.v, start, size, ok)
		}
	}
}
