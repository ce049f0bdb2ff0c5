"""A stand-in for the published `branchkey` leaf client (PyPI, 2.0 line), for tests.

PyPI is not reachable where this repository's tests run, so the example in
examples/python is tested against this package instead. It has the published
client's interface (Client(credentials, host), login, logout, file_upload,
file_download, the queue of announced aggregation ids, run_status) and makes the
same HTTP and AMQP calls, as shared/spec/wire-v1.md states them. With the real
client installed, leave this directory off PYTHONPATH.
"""
