#!/usr/bin/python3
"""A leaf as the published branchkey Python client runs it, notifications over RabbitMQ.

The published client logs in over HTTP, then at once connects to the broker with pika
(virtual host = tree_id, user = leaf id, password = access token, heartbeat 30) and consumes
its queue (named after its leaf id) in a thread, with manual acks, declaring nothing. This
script does the same, then checks what the server promises around it.

  pika_leaf.py amqp SCENARIO.json
SCENARIO.json: {"server", "admin_token", "tree", "branch", "amqp_host", "amqp_port",
                "leaves": [{"name", "password"}...], "fixtures"}
Prints "ok" last. Needs python3-pika, python3-requests, python3-numpy.
"""
import json
import os
import queue
import sys
import tempfile
import threading
import time

import numpy as np
import pika
import requests

FILE_METADATA = "{'key1':'value1', 'key2':'value2'}"


def params(sc, user, password):
    return pika.ConnectionParameters(host=sc["amqp_host"], port=sc["amqp_port"], virtual_host=sc["tree"],
                                     credentials=pika.PlainCredentials(user, password), heartbeat=30)


class Consumer(threading.Thread):
    """The published client's consumer thread: basic_consume, ack after handling."""

    def __init__(self, sc, leaf_id, token):
        super().__init__(daemon=True)
        self.messages = queue.Queue()
        self.closed = threading.Event()
        self.conn = pika.BlockingConnection(params(sc, leaf_id, token))  # right after login
        self.channel = self.conn.channel()
        self.channel.basic_consume(queue=leaf_id, on_message_callback=self.on_message, auto_ack=False)

    def on_message(self, ch, method, props, body):
        self.messages.put((props.message_id, props.delivery_mode, json.loads(body.decode("utf-8"))))
        ch.basic_ack(delivery_tag=method.delivery_tag)

    def run(self):
        try:
            self.channel.start_consuming()
        except Exception as e:  # the broker closing the connection ends the thread
            self.error = e
        self.closed.set()

    def next(self, kind, timeout=30):
        end = time.time() + timeout
        while time.time() < end:
            try:
                mid, mode, msg = self.messages.get(timeout=max(0.01, end - time.time()))
            except queue.Empty:
                break
            assert mid and mode == 2, (mid, mode)  # a message_id, persistent
            if msg["message_type"] == kind:
                return msg
        raise AssertionError(f"no {kind} message within {timeout}s")


def login(sc, leaf):
    r = requests.put(sc["server"] + "/v1/leaf/login", auth=(leaf["name"], leaf["password"]),
                     data=json.dumps({"tree_id": sc["tree"], "branch_id": sc["branch"]}),
                     headers={"accept": "application/json"})
    assert r.status_code == 201, (r.status_code, r.text)
    d = r.json()["data"]
    return d["id"], d["access_token"]


def refused(fn):
    """Run fn on a fresh channel; return the broker's reply code."""
    try:
        fn()
    except (pika.exceptions.ChannelClosedByBroker, pika.exceptions.ConnectionClosedByBroker) as e:
        return e.reply_code
    except (pika.exceptions.ProbableAccessDeniedError, pika.exceptions.ProbableAuthenticationError):
        return 403
    return None


def amqp(sc):
    fx = sc["fixtures"]
    ids = [login(sc, l) for l in sc["leaves"]]
    consumers = [Consumer(sc, lid, tok) for lid, tok in ids]
    for c in consumers:
        c.start()
    for i, (lid, tok) in enumerate(ids):
        with open(os.path.join(fx, "round_0", f"leaf{i}.npy"), "rb") as fh:
            r = requests.post(sc["server"] + "/v1/file/upload", auth=(lid, tok),
                              files={"file": (f"leaf{i}.npy", fh)},
                              data={"data": json.dumps({"leaf_name": sc["leaves"][i]["name"], "metadata": FILE_METADATA})})
        assert r.status_code == 201, (r.status_code, r.text)
    want = np.load(os.path.join(fx, "round_0", "fedavg.npy"), allow_pickle=True)
    out = tempfile.mkdtemp()
    for i, c in enumerate(consumers):
        msg = c.next("aggregation_status")
        agg = msg["body"]["aggregation_id"]
        assert msg["body"]["round"] == 1, msg
        lid, tok = ids[i]
        r = requests.get(sc["server"] + "/v1/file/download/" + agg, auth=(lid, tok))
        assert r.status_code == 200 and len(r.content) > 0, (r.status_code, r.text[:200])
        path = os.path.join(out, agg)
        open(path, "wb").write(r.content)
        arr = np.load(path, allow_pickle=True)
        assert type(arr[0]) is int and type(arr[1]) is list and type(arr[1][0]) is np.ndarray
        assert arr[0] == want[0]
        for a, b in zip(arr[1], want[1]):
            assert np.allclose(a, b, rtol=2 ** -23, atol=0)

    # a leaf's credentials reach its own queue and nothing else
    lid, tok = ids[0]
    other = ids[1][0]
    conn = pika.BlockingConnection(params(sc, lid, tok))
    assert refused(lambda: conn.channel().basic_consume(queue=other, on_message_callback=lambda *a: None)) == 403
    assert refused(lambda: conn.channel().basic_get(queue=other)) == 403
    assert refused(lambda: conn.channel().queue_declare(queue="mine", durable=True)) == 403
    assert refused(lambda: conn.channel().queue_declare(queue=lid, durable=True)) == 403
    assert refused(lambda: conn.channel().exchange_declare(exchange="x", exchange_type="fanout")) == 403

    def publish():
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(exchange=sc["branch"], routing_key="", body=b"{}")
    assert refused(publish) == 403
    conn.close()

    # run_status reaches the consumers
    r = requests.put(sc["server"] + f"/v1/admin/trees/{sc['tree']}/branches/{sc['branch']}/run",
                     json={"status": "pause"}, headers={"Authorization": "Bearer " + sc["admin_token"]})
    assert r.status_code == 200, r.text
    for c in consumers:
        assert c.next("run_status")["body"]["run_status"] == "pause"

    # logout: the open connection is closed and the old token no longer connects
    r = requests.put(sc["server"] + "/v1/leaf/logout", auth=(sc["leaves"][0]["name"], sc["leaves"][0]["password"]))
    assert r.status_code == 200, r.text
    assert consumers[0].closed.wait(10), "the logged-out leaf's connection stayed open"
    assert refused(lambda: pika.BlockingConnection(params(sc, lid, tok))) == 403
    # the others keep consuming
    assert not consumers[1].closed.is_set()
    print("ok")


if __name__ == "__main__":
    scenario = json.load(open(sys.argv[2]))
    {"amqp": amqp}[sys.argv[1]](scenario)
