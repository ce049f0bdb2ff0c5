"""Consume a leaf's queue exactly as the published branchkey Python client does.

pika BlockingConnection with virtual_host = tree, PlainCredentials(leaf, token)
and heartbeat 30; basic_consume on the leaf's queue with manual acks; each
message acked after handling; nothing declared. Prints what it received as one
JSON object on stdout:

  {"messages": [{"body": ..., "message_id": ..., "delivery_mode": ...,
                 "content_type": ..., "type": ..., "timestamp": ...}, ...]}

or, when the broker refuses the consume, {"refused": true, "reply_code": 403,
"reply_text": "..."}. The rabbitmq package's Go tests run it with
/usr/bin/python3 and Debian's python3-pika.
"""

import argparse
import json
import sys

import pika


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=5672)
    p.add_argument("--vhost", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--count", type=int, default=1, help="stop after this many messages")
    p.add_argument("--timeout", type=float, default=20, help="stop after this many seconds")
    args = p.parse_args()

    params = pika.ConnectionParameters(
        host=args.host,
        port=args.port,
        virtual_host=args.vhost,
        credentials=pika.PlainCredentials(args.user, args.password),
        heartbeat=30,
    )
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    received = []

    def on_message(ch, method, properties, body):
        received.append(
            {
                "body": json.loads(body.decode("utf-8")),
                "message_id": properties.message_id,
                "delivery_mode": properties.delivery_mode,
                "content_type": properties.content_type,
                "type": properties.type,
                "timestamp": properties.timestamp,
            }
        )
        ch.basic_ack(delivery_tag=method.delivery_tag)
        if len(received) >= args.count:
            ch.stop_consuming()

    try:
        channel.basic_consume(queue=args.queue, on_message_callback=on_message, auto_ack=False)
    except pika.exceptions.ChannelClosedByBroker as e:
        json.dump({"refused": True, "reply_code": e.reply_code, "reply_text": e.reply_text}, sys.stdout)
        connection.close()
        return
    connection.call_later(args.timeout, channel.stop_consuming)
    channel.start_consuming()
    connection.close()
    json.dump({"messages": received}, sys.stdout)


if __name__ == "__main__":
    main()
