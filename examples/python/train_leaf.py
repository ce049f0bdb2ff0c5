#!/usr/bin/env python3
"""Train a PyTorch model on one leaf of a branchkey federation, with the published client.

Each round the leaf trains on its own data, exports the model's parameters in the
weights format (a (num_samples, [ndarray, ...]) object array saved with np.save), uploads
them, waits for the server to announce the new aggregate on RabbitMQ, downloads it and
loads it into the model before the next round.

    pip install branchkey torch numpy           # the published client, 2.0 line
    python3 train_leaf.py --credentials leaf.json --server http://127.0.0.1:8080 \\
        --leaf-index 0 --leaves 2 --rounds 3

leaf.json holds the published client's credentials:
    {"leaf_name": "...", "leaf_password": "...", "tree_id": "...", "branch_id": "...",
     "queue_password": "", "host": "127.0.0.1", "port": 5672}
("branchkey admin leaf create" prints the name and password; host/port are the RabbitMQ
broker the server was started with, --amqp-url.)

The data is the UCI handwritten digits set that ships with this repository
(demo/digits.csv.gz: 64 pixel values then the label per line), split so that each leaf
sees mostly some digits: the kind of skew federated averaging has to cope with.
"""
import argparse
import gzip
import json
import os
import queue

import numpy as np
import torch
from torch import nn

from branchkey.client import Client

HERE = os.path.dirname(os.path.abspath(__file__))
DIGITS = os.path.join(HERE, "..", "..", "demo", "digits.csv.gz")


def load_digits():
    with gzip.open(DIGITS, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x, y = data[:, :64] / 16.0, data[:, 64].astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    cut = int(0.8 * len(y))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def leaf_share(x, y, index, leaves):
    """Label skew: leaf i gets 80% of the examples of the digits d with d % leaves == i."""
    rng = np.random.default_rng(100 + index)
    mine = (y % leaves) == index
    keep = mine & (rng.random(len(y)) < 0.8) | ~mine & (rng.random(len(y)) < 0.2 / max(leaves - 1, 1))
    return x[keep], y[keep]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.layers(x)


def export_update(model, num_samples, path):
    """The weights format: element 0 an int, element 1 a list of ndarrays in model order."""
    params = [p.detach().cpu().numpy() for p in model.parameters()]
    update = np.empty(2, dtype=object)
    update[0] = int(num_samples)
    update[1] = params
    np.save(path, update, allow_pickle=True)
    return path


def load_aggregate(model, path):
    arr = np.load(path, allow_pickle=True)
    with torch.no_grad():
        for p, a in zip(model.parameters(), arr[1]):
            p.copy_(torch.from_numpy(np.ascontiguousarray(a)).to(p.dtype))
    return int(arr[0])


def train(model, x, y, epochs, lr):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for i in torch.randperm(len(ys)).split(16):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs[i]), ys[i]).backward()
            opt.step()


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1) == torch.from_numpy(y)).float().mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--credentials", required=True)
    ap.add_argument("--server", default="http://127.0.0.1:8080")
    ap.add_argument("--leaf-index", type=int, default=0)
    ap.add_argument("--leaves", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for each aggregate")
    args = ap.parse_args()

    torch.manual_seed(0)  # every leaf starts from the same model
    (xtr, ytr), (xte, yte) = load_digits()
    x, y = leaf_share(xtr, ytr, args.leaf_index, args.leaves)
    model = Net()

    credentials = json.load(open(args.credentials))
    client = Client(credentials, host=args.server)
    client.login()  # also starts the consumer thread on the leaf's RabbitMQ queue
    try:
        for rnd in range(1, args.rounds + 1):
            train(model, x, y, args.epochs, lr=0.05)
            local = accuracy(model, xte, yte)
            path = export_update(model, len(y), f"update-{client.leaf_id}-{rnd}.npy")
            file_id = client.file_upload(path)
            try:
                aggregation_id = client.queue.get(timeout=args.timeout)
            except queue.Empty:
                raise SystemExit(f"round {rnd}: no aggregate announced within {args.timeout}s")
            client.file_download(aggregation_id)  # writes ./aggregated_files/<aggregation_id>
            total = load_aggregate(model, os.path.join("aggregated_files", aggregation_id))
            print(json.dumps({"round": rnd, "leaf": args.leaf_index, "samples": len(y), "uploaded": file_id,
                              "aggregate": aggregation_id, "aggregate_samples": total,
                              "local_accuracy": round(local, 4), "global_accuracy": round(accuracy(model, xte, yte), 4)}),
                  flush=True)
    finally:
        client.logout()


if __name__ == "__main__":
    main()
