package client

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Bounds of what the event stream parser holds.
const (
	maxSSELine = 1 << 20
	maxSSEData = 16 << 20
	// maxSSERetry caps the reconnection time a server may ask for.
	maxSSERetry = time.Minute
)

// sseEvent is one dispatched Server-Sent Event.
type sseEvent struct {
	// ID is the last event id once the event is dispatched: the event's own
	// id field, or the one before it.
	ID    string
	Event string
	Data  string
}

// sseReader parses a text/event-stream as the HTML standard says: lines
// end with CRLF, LF or CR; a blank line dispatches the event; a line
// starting with ':' is a comment; fields are data, event, id and retry, and
// unknown fields are ignored. Lines and events are bounded.
type sseReader struct {
	sc     *bufio.Scanner
	lastID string
	// retry is the reconnection time the stream asked for, 0 if none.
	retry time.Duration
	// onLine is called after each line (the stall watchdog's kick).
	onLine func()
	first  bool
}

func newSSEReader(r io.Reader, lastID string) *sseReader {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), maxSSELine)
	sc.Split(scanSSELines)
	return &sseReader{sc: sc, lastID: lastID, first: true}
}

// scanSSELines splits at CRLF, LF or a lone CR.
func scanSSELines(data []byte, atEOF bool) (int, []byte, error) {
	if i := bytes.IndexAny(data, "\r\n"); i >= 0 {
		if data[i] == '\n' {
			return i + 1, data[:i], nil
		}
		if i+1 < len(data) {
			if data[i+1] == '\n' {
				return i + 2, data[:i], nil
			}
			return i + 1, data[:i], nil
		}
		if atEOF {
			return i + 1, data[:i], nil
		}
		return 0, nil, nil // a CR at the end: see whether LF follows
	}
	if atEOF && len(data) > 0 {
		return len(data), data, nil
	}
	return 0, nil, nil
}

// Next returns the next event with data. io.EOF when the stream ends; an
// event the stream did not finish with a blank line is dropped, as the
// standard says.
func (r *sseReader) Next() (sseEvent, error) {
	var data strings.Builder
	var event string
	hasData := false
	for r.sc.Scan() {
		line := r.sc.Bytes()
		if r.onLine != nil {
			r.onLine()
		}
		if r.first {
			line = bytes.TrimPrefix(line, []byte("\xEF\xBB\xBF"))
			r.first = false
		}
		if len(line) == 0 {
			if !hasData {
				event = ""
				continue
			}
			return sseEvent{ID: r.lastID, Event: event, Data: strings.TrimSuffix(data.String(), "\n")}, nil
		}
		if line[0] == ':' {
			continue
		}
		field, value, _ := bytes.Cut(line, []byte(":"))
		value = bytes.TrimPrefix(value, []byte(" "))
		switch string(field) {
		case "event":
			event = string(value)
		case "data":
			if data.Len()+len(value)+1 > maxSSEData {
				return sseEvent{}, fmt.Errorf("an event's data is larger than %d bytes", maxSSEData)
			}
			data.Write(value)
			data.WriteByte('\n')
			hasData = true
		case "id":
			if bytes.IndexByte(value, 0) < 0 {
				r.lastID = string(value)
			}
		case "retry":
			if ms, err := strconv.ParseUint(string(value), 10, 64); err == nil {
				r.retry = time.Duration(min(ms, uint64(maxSSERetry/time.Millisecond))) * time.Millisecond
			}
		}
	}
	if err := r.sc.Err(); err != nil {
		return sseEvent{}, err
	}
	return sseEvent{}, io.EOF
}

// sseRetry returns the reconnection time the server last asked for.
func (c *Client) sseRetry() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.retryAfterSSE
}

// consumeSSE holds one GET /v1/events stream, from the event after the
// last one delivered, and delivers its events.
func (c *Client) consumeSSE(ctx context.Context, s *Session, deliver func(context.Context, Notification) error) (bool, error) {
	actx, dog, stop := newWatchdog(ctx, c.stall)
	defer stop()
	req, err := c.newRequest(actx, http.MethodGet, "/v1/events", nil, s.LeafID, s.AccessToken)
	if err != nil {
		return false, err
	}
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Cache-Control", "no-cache")
	last := c.LastEventID()
	if last != "" {
		req.Header.Set("Last-Event-ID", last)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return false, transportError(ctx, actx, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return false, errorFrom(resp)
	}
	if mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); mt != "text/event-stream" {
		return false, fmt.Errorf("GET /v1/events answered %q, not text/event-stream", resp.Header.Get("Content-Type"))
	}
	lastSeq, seqOK := parseSeq(last)
	r := newSSEReader(resp.Body, last)
	r.onLine = func() {
		dog.kick()
		if r.retry > 0 {
			c.mu.Lock()
			c.retryAfterSSE = r.retry
			c.mu.Unlock()
		}
	}
	delivered := false
	for {
		ev, err := r.Next()
		if err != nil {
			if err == io.EOF {
				return delivered, fmt.Errorf("%w: the server closed the event stream", errConnection)
			}
			return delivered, transportError(ctx, actx, err)
		}
		if seq, ok := parseSeq(ev.ID); ok && seqOK && seq <= lastSeq {
			continue // a replay of something delivered
		}
		n, err := parseNotification([]byte(ev.Data), ev.ID)
		// The cursor moves before the hand-over, so that a reader who just
		// got the notification sees LastEventID at it; it moves back if the
		// hand-over fails.
		c.mu.Lock()
		prev := c.lastEvent
		c.lastEvent = ev.ID
		c.mu.Unlock()
		if err != nil {
			c.log.Warn("dropped an event that is not a notification", "id", ev.ID, "event", ev.Event, "err", err)
		} else {
			// The reader may take its time; that is no stall.
			dog.pause()
			if err := deliver(ctx, n); err != nil {
				c.mu.Lock()
				c.lastEvent = prev
				c.mu.Unlock()
				return delivered, err
			}
			dog.kick()
			delivered = true
		}
		lastSeq, seqOK = parseSeq(ev.ID)
	}
}

// parseSeq reads an event id the server numbers.
func parseSeq(id string) (int64, bool) {
	n, err := strconv.ParseInt(id, 10, 64)
	return n, err == nil
}
