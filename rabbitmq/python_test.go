package rabbitmq_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/branchkey/branchkey"
	amqp "github.com/rabbitmq/amqp091-go"
)

// python is Debian's interpreter, which has python3-pika; the python3 on
// PATH may be another one.
const python = "/usr/bin/python3"

// consumeResult is what testdata/consume.py prints.
type consumeResult struct {
	Messages []struct {
		Body         json.RawMessage `json:"body"`
		MessageID    string          `json:"message_id"`
		DeliveryMode int             `json:"delivery_mode"`
		ContentType  string          `json:"content_type"`
		Type         string          `json:"type"`
		Timestamp    int64           `json:"timestamp"`
	} `json:"messages"`
	Refused   bool   `json:"refused"`
	ReplyCode int    `json:"reply_code"`
	ReplyText string `json:"reply_text"`
}

// runConsumer runs testdata/consume.py as leaf l on queue.
func runConsumer(t *testing.T, l leaf, queue string, count int) consumeResult {
	t.Helper()
	amqpURL, _ := testURLs(t)
	uri, err := amqp.ParseURI(amqpURL)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, python, "testdata/consume.py",
		"--host", uri.Host, "--port", strconv.Itoa(uri.Port),
		"--vhost", l.tree, "--user", l.id, "--password", l.token,
		"--queue", queue, "--count", strconv.Itoa(count), "--timeout", "20")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s testdata/consume.py: %v\n%s", python, err, stderr.String())
	}
	var res consumeResult
	if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
		t.Fatalf("consume.py printed %q: %v\n%s", stdout.String(), err, stderr.String())
	}
	return res
}

// TestPythonClient consumes with pika as the published leaf client does.
func TestPythonClient(t *testing.T) {
	b := MustBroker(t)
	tree := MustTree(t, b, nil)
	branch := uniqueName("branch")
	l := MustLeaf(t, b, tree, branch)
	other := MustLeaf(t, b, tree, branch)
	n := MustNotifier(t)

	t.Run("Consume", func(t *testing.T) {
		msgs := []*branchkey.Message{
			newMessage(l, branchkey.MessageAggregationStatus, `{"aggregation_id":"agg-7","round":1,"num_samples":120}`),
			newMessage(l, branchkey.MessageRunStatus, `{"run_status":"stop"}`),
		}
		for _, m := range msgs {
			mustPublish(t, n, m)
		}
		res := runConsumer(t, l, l.id, len(msgs))
		if len(res.Messages) != len(msgs) {
			t.Fatalf("pika got %d messages, want %d: %+v", len(res.Messages), len(msgs), res)
		}
		for i, got := range res.Messages {
			m := msgs[i]
			if got.MessageID != m.ID || got.DeliveryMode != 2 || got.ContentType != "application/json" ||
				got.Type != m.Type || got.Timestamp != m.CreatedAt.Unix() {
				t.Errorf("message %d: %+v, want id %s, persistent, JSON, type %s", i, got, m.ID, m.Type)
			}
			var body struct {
				MessageType string          `json:"message_type"`
				Body        json.RawMessage `json:"body"`
			}
			if err := json.Unmarshal(got.Body, &body); err != nil {
				t.Fatal(err)
			}
			if body.MessageType != m.Type || !jsonEqual(body.Body, m.Body) {
				t.Errorf("message %d body: %s", i, got.Body)
			}
		}
		// Acked: pika's connection is closed, so anything unacked would be
		// back in the queue.
		ch := mustChannel(t, mustDialLeaf(t, l))
		if d, ok, err := ch.Get(l.id, false); err != nil || ok {
			t.Errorf("queue %s after pika acked: message %q, err %v; want empty", l.id, d.MessageId, err)
		}
	})
	t.Run("OtherQueueRefused", func(t *testing.T) {
		res := runConsumer(t, l, other.id, 1)
		if !res.Refused || res.ReplyCode != 403 {
			t.Fatalf("pika consuming %s as %s: %+v, want ACCESS_REFUSED (403)", other.id, l.id, res)
		}
	})
}

func jsonEqual(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	xb, _ := json.Marshal(x)
	yb, _ := json.Marshal(y)
	return bytes.Equal(xb, yb)
}
