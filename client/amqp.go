package client

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/branchkey/branchkey"
	amqp "github.com/rabbitmq/amqp091-go"
)

const (
	// amqpHeartbeat is the published client's heartbeat.
	amqpHeartbeat = 30 * time.Second
	// amqpDialTimeout bounds the TCP connection and the AMQP handshake.
	amqpDialTimeout = 15 * time.Second
	// amqpPrefetch bounds the messages the broker sends ahead of acks;
	// what was sent but not acked goes back to the queue when the
	// connection closes.
	amqpPrefetch = 8
	// dedupeWindow is how many message ids are remembered to drop
	// redeliveries.
	dedupeWindow = 4096
)

// consumeAMQP holds one AMQP connection, as the published client does
// (virtual host = tree, user = leaf id, password = access token, heartbeat
// 30s), consumes the leaf's queue with manual acks, and acks each message
// once it is in the Updates channel.
func (c *Client) consumeAMQP(ctx context.Context, s *Session, deliver func(context.Context, Notification) error) (bool, error) {
	addr := net.JoinHostPort(c.creds.BrokerHost(), strconv.Itoa(c.creds.BrokerPort()))
	conn, err := amqp.DialConfig("amqp://"+addr+"/", amqp.Config{
		Vhost:     c.creds.TreeID,
		SASL:      []amqp.Authentication{&amqp.PlainAuth{Username: s.LeafID, Password: s.AccessToken}},
		Heartbeat: amqpHeartbeat,
		Locale:    "en_US",
		Dial: func(network, addr string) (net.Conn, error) {
			d := net.Dialer{Timeout: amqpDialTimeout, KeepAlive: 30 * time.Second}
			nc, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			// amqp091 clears the deadline once the handshake is done.
			if err := nc.SetDeadline(time.Now().Add(amqpDialTimeout)); err != nil {
				nc.Close()
				return nil, err
			}
			return nc, nil
		},
	})
	if err != nil {
		return false, amqpError(fmt.Sprintf("connect to the broker at %s, vhost %q", addr, c.creds.TreeID), err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return false, amqpError("open a channel", err)
	}
	if err := ch.Qos(amqpPrefetch, 0, false); err != nil {
		return false, amqpError("set the prefetch", err)
	}
	closed := conn.NotifyClose(make(chan *amqp.Error, 1))
	chClosed := ch.NotifyClose(make(chan *amqp.Error, 1))
	deliveries, err := ch.ConsumeWithContext(ctx, s.LeafID, "", false, false, false, false, nil)
	if err != nil {
		return false, amqpError(fmt.Sprintf("consume queue %q", s.LeafID), err)
	}
	c.mu.Lock()
	if c.seen == nil {
		c.seen = newSeenIDs(dedupeWindow)
	}
	seen := c.seen
	c.mu.Unlock()
	delivered := false
	for {
		select {
		case <-ctx.Done():
			return delivered, nil // the close requeues what was not acked
		case e := <-closed:
			return delivered, amqpClosed("connection", e)
		case e := <-chClosed:
			return delivered, amqpClosed("channel", e)
		case d, ok := <-deliveries:
			if !ok {
				return delivered, fmt.Errorf("%w: the broker ended the consumer", errConnection)
			}
			if d.MessageId != "" && seen.has(d.MessageId) {
				if err := d.Ack(false); err != nil {
					return delivered, amqpError("ack a duplicate", err)
				}
				continue
			}
			n, err := parseNotification(d.Body, d.MessageId)
			if err != nil {
				// Requeueing would loop on it; the published client would
				// fail on it too.
				c.log.Warn("dropped a message that is not a notification", "message_id", d.MessageId, "err", err)
			} else {
				if err := deliver(ctx, n); err != nil {
					return delivered, nil
				}
				delivered = true
			}
			if d.MessageId != "" {
				seen.add(d.MessageId)
			}
			if err := d.Ack(false); err != nil {
				return delivered, amqpError("ack", err)
			}
		}
	}
}

// amqpError describes a failed AMQP operation; a refusal of the
// credentials or permissions is EUNAUTHORIZED, so the consumer logs in
// again (which provisions the leaf's broker side and password anew).
func amqpError(op string, err error) error {
	var ae *amqp.Error
	if errors.Is(err, amqp.ErrCredentials) || errors.Is(err, amqp.ErrVhost) ||
		(errors.As(err, &ae) && (ae.Code == amqp.AccessRefused || ae.Code == amqp.NotAllowed || ae.Code == amqp.NotFound)) {
		return &Error{Code: branchkey.EUNAUTHORIZED, Message: fmt.Sprintf("%s: %v", op, err), Err: err}
	}
	return fmt.Errorf("%w: %s: %w", errConnection, op, err)
}

// amqpClosed describes a connection or channel the broker closed.
func amqpClosed(what string, e *amqp.Error) error {
	if e == nil {
		return fmt.Errorf("%w: the broker closed the %s", errConnection, what)
	}
	return amqpError("the broker closed the "+what, e)
}
