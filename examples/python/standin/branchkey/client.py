"""Client: the published client's interface, over the v1 wire contract."""
import json
import os
import sys
import threading
from queue import Queue

import numpy as np
import pika
import requests

AGGREGATED_OUTPUT_DIR = "./aggregated_files"
FILE_METADATA = "{'key1':'value1', 'key2':'value2'}"


class Client:
    def __init__(self, credentials, host="https://api.branchkey.com"):
        creds = dict(credentials)
        if "response_host" in creds:
            creds["host"] = creds["response_host"]
        self._creds = creds
        self._host = host
        self._status = False
        self._leaf_id = self._token = None
        self._run_status = "pause"
        self.queue = Queue()
        self.consumer = None

    # -- the published client's calls ------------------------------------------------
    def login(self):
        body = json.dumps({"tree_id": self._creds["tree_id"], "branch_id": self._creds["branch_id"]})
        r = requests.put(self._host + "/v1/leaf/login", data=body, headers={"accept": "application/json"},
                         auth=(self._creds["leaf_name"], self._creds["leaf_password"]))
        if r.status_code != 201:
            raise Exception("Login failed for {}: {}".format(self._creds["leaf_name"], r.json()["message"]))
        d = r.json()["data"]
        self._leaf_id, self._token, self._status = d["id"], d["access_token"], d["status"]
        self.consumer = _Consumer(self._creds, self._leaf_id, self._token, self.queue, self._set_run_status)
        return self._status == "logged_in"

    def logout(self):
        r = requests.put(self._host + "/v1/leaf/logout", auth=(self._creds["leaf_name"], self._creds["leaf_password"]))
        if r.status_code != 200:
            raise Exception("Logout failed: {}".format(r.json()["message"]))
        self._token, self._status = None, "logged_out"
        return True

    def file_upload(self, file_path):
        with open(file_path, "rb") as f:
            self.validate_weight_shape(f)
            data = {"data": json.dumps({"leaf_name": self._creds["leaf_name"], "metadata": FILE_METADATA})}
            r = requests.post(self._host + "/v1/file/upload", files={"file": f}, data=data,
                              headers={"accept": "application/json"}, auth=(self._leaf_id, self._token))
        if r.status_code != 201:
            raise Exception("File Upload failed for {}: {}".format(file_path, r.json()["error"]))
        return r.json()["data"]["file_id"]

    def file_download(self, file_id):
        os.makedirs(AGGREGATED_OUTPUT_DIR, exist_ok=True)
        r = requests.get(self._host + "/v1/file/download/" + file_id, auth=(self._leaf_id, self._token))
        if r.status_code != 200:
            raise Exception("File Download failed for {}: {}".format(file_id, r.json()["error"]))
        if len(r.content) == 0:
            raise Exception("File Download failed for {}: file not received".format(file_id))
        with open(os.path.join(AGGREGATED_OUTPUT_DIR, file_id), "wb") as f:
            f.write(r.content)
        return True

    @staticmethod
    def validate_weight_shape(f):
        arr = np.load(f, allow_pickle=True)
        if arr.shape[0] != 2 or type(arr[0]) is not int or type(arr[1]) is not list or type(arr[1][0]) is not np.ndarray:
            raise Exception("[validate_weight_shape] not a (num_samples, [ndarray, ...]) update")
        f.seek(0)
        return True

    def _set_run_status(self, status):
        self._run_status = status

    @property
    def leaf_id(self):
        return self._leaf_id

    @property
    def access_token(self):
        return self._token

    @property
    def is_logged_in(self):
        return self._status == "logged_in"

    @property
    def run_status(self):
        return self._run_status


class _Consumer:
    """Consumes the leaf's queue in a daemon thread, as the published client does:
    connect right after login (virtual host = tree, user = leaf id, password = token),
    basic_consume with manual acks, put each aggregation_id on the queue, apply run_status.
    A failed connection ends the process, as in the published client."""

    def __init__(self, creds, leaf_id, token, q, on_run_status):
        params = pika.ConnectionParameters(
            host=creds.get("host", "127.0.0.1"), port=int(creds.get("port", 5672)), virtual_host=creds["tree_id"],
            credentials=pika.PlainCredentials(leaf_id, token), heartbeat=30, connection_attempts=3, retry_delay=3,
            client_properties={"connection_name": "leaf-" + leaf_id})
        try:
            self.conn = pika.BlockingConnection(params)
        except Exception as e:
            sys.exit("[Consumer] Error while connecting to rabbitmq: " + str(e))
        self.channel = self.conn.channel()
        self.q, self.on_run_status, self.queue_name = q, on_run_status, leaf_id
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on_message(self, ch, method, props, body):
        msg = json.loads(body.decode())
        if msg["message_type"] == "aggregation_status":
            self.q.put(msg["body"]["aggregation_id"])
        elif msg["message_type"] == "run_status":
            self.on_run_status(msg["body"]["run_status"])
        ch.basic_ack(delivery_tag=method.delivery_tag)

    def _run(self):
        self.channel.basic_consume(queue=self.queue_name, on_message_callback=self._on_message)
        try:
            self.channel.start_consuming()
        except Exception:
            pass
