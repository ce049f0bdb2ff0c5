#!/usr/bin/python3
"""Speak the v1 wire contract exactly as the published branchkey Python client does.

The published client (the `branchkey` package, 2.0 line) is not installable here, so this
script makes the same calls it makes: the same verbs and paths, HTTP Basic auth, the
`accept: application/json` header, the login body as a JSON string without a content type,
and the multipart upload with a `data` field (a JSON string) and a `file` field named after
the file. It then checks what the published client checks.

  wire_leaf.py happy SCENARIO.json   three leaves: login, upload, SSE notification, download,
                                     np.load equal to numpy's FedAvg, logout
  wire_leaf.py errors SCENARIO.json  every error status, hostile files, logout

SCENARIO.json: {"server": URL, "admin_token": T, "tree": ..., "branch": ...,
                "leaves": [{"name", "password"}...], "fixtures": DIR, ...}
Prints "ok" last; any failed check raises. Needs python3-requests and python3-numpy.
"""
import json
import os
import sys
import tempfile

import numpy as np
import requests

FILE_METADATA = "{'key1':'value1', 'key2':'value2'}"


class Leaf:
    """The calls of the published client's Client, one for one."""

    def __init__(self, server, name, password, tree, branch):
        self.server, self.name, self.password = server, name, password
        self.tree, self.branch = tree, branch
        self.id = self.token = None

    def login(self):
        r = requests.put(self.server + "/v1/leaf/login", auth=(self.name, self.password),
                         data=json.dumps({"tree_id": self.tree, "branch_id": self.branch}),
                         headers={"accept": "application/json"})
        if r.status_code == 201:
            d = r.json()["data"]
            assert d["status"] == "logged_in", d
            self.id, self.token = d["id"], d["access_token"]
        return r

    def logout(self):
        return requests.put(self.server + "/v1/leaf/logout", auth=(self.name, self.password),
                            headers={"accept": "application/json"})

    def upload(self, path, name=None):
        # the published client checks the file before it sends it
        with open(path, "rb") as fh:
            files = {"file": (name or os.path.basename(path), fh)}
            data = {"data": json.dumps({"leaf_name": self.name, "metadata": FILE_METADATA})}
            return requests.post(self.server + "/v1/file/upload", auth=(self.id, self.token),
                                 files=files, data=data, headers={"accept": "application/json"})

    def download(self, file_id, out_dir):
        r = requests.get(self.server + "/v1/file/download/" + file_id, auth=(self.id, self.token))
        if r.status_code == 200:
            assert len(r.content) > 0, "empty body"
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, file_id), "wb") as f:
                f.write(r.content)
        return r

    def events(self, last_event_id=None, want=1, timeout=20):
        """Read SSE until `want` messages arrived; returns [(id, payload)]."""
        headers = {"accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        got, ev = [], {}
        with requests.get(self.server + "/v1/events", auth=(self.id, self.token), headers=headers,
                          stream=True, timeout=timeout) as r:
            assert r.status_code == 200, (r.status_code, r.text)
            assert r.headers["content-type"].startswith("text/event-stream"), r.headers
            for raw in r.iter_lines():
                line = raw.decode()
                if line.startswith("id: "):
                    ev["id"] = int(line[4:])
                elif line.startswith("data: "):
                    ev["data"] = json.loads(line[6:])
                elif line == "" and "data" in ev:
                    got.append((ev["id"], ev["data"]))
                    ev = {}
                    if len(got) >= want:
                        return got
        return got


def check_update_file(path):
    """What the published client checks before an upload, and after a download."""
    arr = np.load(path, allow_pickle=True)
    assert arr.shape[0] == 2, arr.shape
    assert type(arr[0]) is int, type(arr[0])
    assert type(arr[1]) is list, type(arr[1])
    assert type(arr[1][0]) is np.ndarray, type(arr[1][0])
    return arr


def expect(r, status, key, says):
    """Check an answer's status and that its JSON error text (under the key the
    published client reads) says what is wrong."""
    assert r.status_code == status, f"status {r.status_code}, want {status}: {r.text[:300]}"
    if key:
        body = r.json()
        assert says.lower() in body[key].lower(), f"{key}={body[key]!r} does not say {says!r}"


def admin(sc, method, path, body=None):
    r = requests.request(method, sc["server"] + path, json=body,
                         headers={"Authorization": "Bearer " + sc["admin_token"]})
    assert r.status_code // 100 == 2, (r.status_code, r.text)
    return r.json()


def happy(sc):
    fx = sc["fixtures"]
    leaves = [Leaf(sc["server"], l["name"], l["password"], sc["tree"], sc["branch"]) for l in sc["leaves"]]
    for lf in leaves:
        expect(lf.login(), 201, None, None)
    ids = []
    for i, lf in enumerate(leaves):
        path = os.path.join(fx, "round_0", f"leaf{i}.npy")
        check_update_file(path)
        r = lf.upload(path)
        expect(r, 201, None, None)
        ids.append(r.json()["data"]["file_id"])
    assert len(set(ids)) == 3, ids
    # a leaf's own upload downloads byte for byte
    out = tempfile.mkdtemp()
    r = leaves[0].download(ids[0], out)
    expect(r, 200, None, None)
    assert open(os.path.join(out, ids[0]), "rb").read() == open(os.path.join(fx, "round_0", "leaf0.npy"), "rb").read()
    # the notification, stored: a leaf connecting after the aggregation still gets it
    (seq, msg), = leaves[2].events(want=1)
    assert msg["message_type"] == "aggregation_status", msg
    body = msg["body"]
    agg = body["aggregation_id"]
    assert body["round"] == 1 and body["num_samples"] == sum(int(np.load(os.path.join(fx, "round_0", f"leaf{i}.npy"), allow_pickle=True)[0]) for i in range(3)), body
    for lf in leaves:
        r = lf.download(agg, os.path.join(out, "aggregated_files"))
        expect(r, 200, None, None)
        assert r.headers["content-length"] == str(len(r.content)), r.headers
    arr = check_update_file(os.path.join(out, "aggregated_files", agg))
    want = np.load(os.path.join(fx, "round_0", "fedavg.npy"), allow_pickle=True)
    assert arr[0] == want[0], (arr[0], want[0])
    for k, (a, b) in enumerate(zip(arr[1], want[1])):
        assert a.dtype == b.dtype and a.shape == b.shape, (k, a.dtype, b.dtype, a.shape, b.shape)
        # numpy's float64 mean cast to float32; ours may differ in the last bit at most
        assert np.allclose(a, b, rtol=2 ** -23, atol=0), (k, np.abs(a - b).max())
    # Range requests
    r = requests.get(sc["server"] + "/v1/file/download/" + agg, auth=(leaves[0].id, leaves[0].token),
                     headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and len(r.content) == 10, (r.status_code, len(r.content))
    # resuming the event stream after the last id gives nothing old again: the next
    # message is round 2's
    for i, lf in enumerate(leaves):
        expect(lf.upload(os.path.join(fx, "round_0", f"leaf{(i + 1) % 3}.npy")), 201, None, None)
    (seq2, msg2), = leaves[0].events(last_event_id=seq, want=1)
    assert seq2 > seq and msg2["body"]["round"] == 2, (seq, seq2, msg2)
    # run status
    r = requests.get(sc["server"] + f"/v1/branch/{sc['branch']}/run", auth=(leaves[0].id, leaves[0].token))
    expect(r, 200, None, None)
    d = r.json()["data"]
    assert d["run_status"] == "start" and d["run_number"] == 1, d
    for lf in leaves:
        expect(lf.logout(), 200, None, None)
    print("ok")


def errors(sc):
    fx = sc["fixtures"]
    server = sc["server"]
    a = Leaf(server, sc["leaves"][0]["name"], sc["leaves"][0]["password"], sc["tree"], sc["branch"])
    b = Leaf(server, sc["leaves"][1]["name"], sc["leaves"][1]["password"], sc["tree"], sc["branch"])
    other = Leaf(server, sc["other_leaf"]["name"], sc["other_leaf"]["password"], sc["tree"], sc["other_branch"])

    # 401: wrong password; unknown leaf; no auth; bad token on file calls
    expect(Leaf(server, a.name, "wrong-password", a.tree, a.branch).login(), 401, "message", "invalid leaf name or password")
    expect(Leaf(server, "nobody", "whatever-pass", a.tree, a.branch).login(), 401, "message", "invalid leaf name or password")
    expect(requests.put(server + "/v1/leaf/login", data="{}"), 401, "message", "credentials")
    # 403: the body names another branch
    expect(Leaf(server, a.name, a.password, a.tree, sc["other_branch"]).login(), 403, "message", "belongs to tree")
    # 400: a login body that is not JSON
    expect(requests.put(server + "/v1/leaf/login", auth=(a.name, a.password), data="tree=t"), 400, "message", "JSON")
    for lf in (a, b, other):
        expect(lf.login(), 201, None, None)
    bad = Leaf(server, a.name, a.password, a.tree, a.branch)
    bad.id, bad.token = a.id, "0" * 64
    expect(bad.upload(os.path.join(fx, "ok_float32_cnn.npy")), 401, "error", "invalid or expired access token")
    expect(bad.download("x", "/tmp"), 401, "error", "invalid or expired access token")

    # the round's first update fixes its shapes
    r = a.upload(os.path.join(fx, "round_0", "leaf0.npy"))
    expect(r, 201, None, None)
    a_file = r.json()["data"]["file_id"]
    expect(b.upload(os.path.join(fx, "round_0_mismatch.npy")), 400, "error", "tensor 0 has shape (6, 5), expected (6, 4)")

    # 400: every hostile fixture, refused with what is wrong, while the server keeps serving
    index = json.load(open(os.path.join(fx, "bad_index.json")))
    says = {
        "bad_exec_os_system.npy": "is not allowed", "bad_truncated.npy": "ends early",
        "bad_magic.npy": "not an npy file", "bad_plain_array.npy": "not an update",
        "bad_float_samples.npy": "num_samples is 3.5", "bad_zero_samples.npy": "num_samples is 0",
        "bad_negative_samples.npy": "num_samples is -4", "bad_tuple_params.npy": "second element is a tuple",
        "bad_empty_params.npy": "parameter list is empty", "bad_string_param.npy": "is a str",
        "bad_object_param.npy": "dtype object", "bad_three_elements.npy": "shape (3,)",
        "bad_huge_length_claim.npy": "bytes", "bad_nan.npy": "NaN or Inf",
    }
    assert set(index) == set(says), set(index) ^ set(says)
    for name in sorted(index):
        expect(b.upload(os.path.join(fx, name)), 400, "error", says[name])
        expect(requests.get(server + "/healthz"), 200, None, None)
    assert not os.path.exists("/tmp/pwned"), "the pickle ran"

    # 413: over the server's size limit (the test server allows 1 MiB)
    big = os.path.join(tempfile.mkdtemp(), "big.npy")
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = 5, [np.zeros((600_000,), np.float32)]
    np.save(big, arr, allow_pickle=True)
    expect(b.upload(big), 413, "error", "limit")

    # 403: another branch's leaf downloads this branch's file; a leaf downloads another's upload
    expect(other.download(a_file, "/tmp"), 403, "error", "another")
    expect(b.download(a_file, "/tmp"), 403, "error", "another leaf's upload")
    r = requests.get(server + f"/v1/branch/{sc['branch']}/run", auth=(other.id, other.token))
    expect(r, 403, "error", "not this leaf's branch")
    # 404: unknown id
    expect(a.download("00000000-0000-0000-0000-000000000000", "/tmp"), 404, "error", "no file with id")

    # 409: uploads while the run is paused or stopped
    admin(sc, "PUT", f"/v1/admin/trees/{sc['tree']}/branches/{sc['branch']}/run", {"status": "pause"})
    expect(b.upload(os.path.join(fx, "round_0", "leaf1.npy")), 409, "error", "paused")
    admin(sc, "PUT", f"/v1/admin/trees/{sc['tree']}/branches/{sc['branch']}/run", {"status": "stop"})
    expect(b.upload(os.path.join(fx, "round_0", "leaf1.npy")), 409, "error", "stopped")
    admin(sc, "PUT", f"/v1/admin/trees/{sc['tree']}/branches/{sc['branch']}/run", {"status": "start"})
    r = requests.get(server + f"/v1/branch/{sc['branch']}/run", auth=(a.id, a.token))
    assert r.json()["data"]["run_number"] == 2, r.text
    # still serving valid uploads after all that
    expect(b.upload(os.path.join(fx, "round_0", "leaf1.npy")), 201, None, None)

    # logout: 200, then the old token is refused everywhere
    old = (a.id, a.token)
    expect(a.logout(), 200, None, None)
    expect(a.upload(os.path.join(fx, "round_0", "leaf0.npy")), 401, "error", "invalid or expired")
    expect(a.download(a_file, "/tmp"), 401, "error", "invalid or expired")
    r = requests.get(server + "/v1/events", auth=old, stream=True)
    expect(r, 401, "error", "invalid or expired")
    expect(Leaf(server, a.name, "wrong-password", a.tree, a.branch).logout(), 401, "message", "invalid leaf name or password")
    # logging in again works and gives a new token
    expect(a.login(), 201, None, None)
    assert a.token != old[1]
    print("ok")


if __name__ == "__main__":
    scenario = json.load(open(sys.argv[2]))
    {"happy": happy, "errors": errors}[sys.argv[1]](scenario)
