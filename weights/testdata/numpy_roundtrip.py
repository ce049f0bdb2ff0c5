#!/usr/bin/python3
"""Round trips between numpy and branchkey's weights codec.

  numpy_roundtrip.py make OUT_DIR   write updates with numpy's np.save and a manifest.json
                                    describing each tensor (dtype.str, shape, fortran, bytes as hex)
  numpy_roundtrip.py check FILE MANIFEST
                                    np.load(FILE, allow_pickle=True), run the published client's
                                    checks, compare every tensor with MANIFEST exactly; print "ok"
Needs numpy; run with /usr/bin/python3.
"""
import json
import os
import sys

import numpy as np


def save_update(path, num_samples, params):
    arr = np.empty(2, dtype=object)
    arr[0] = int(num_samples)
    arr[1] = list(params)
    np.save(path, arr, allow_pickle=True)


def describe(num_samples, params):
    return {
        "num_samples": int(num_samples),
        "tensors": [{
            "dtype": p.dtype.str,
            "shape": list(p.shape),
            "fortran": bool(p.flags.f_contiguous and not p.flags.c_contiguous),
            "hex": p.tobytes(order="A").hex(),
        } for p in params],
    }


def cases(rng):
    def rnd(shape, dt):
        return rng.standard_normal(shape).astype(dt)

    ints = [np.array(rng.integers(-100, 100, size=(3, 2)), dtype=dt) for dt in ("i1", "i2", "i4", "i8")]
    uints = [np.array(rng.integers(0, 200, size=(4,)), dtype=dt) for dt in ("u1", "u2", "u4", "u8")]
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, 3.4e38, np.nan], dtype=np.float32)
    yield "all_dtypes", 42, [rnd((2, 3), np.float16), rnd((3,), np.float32), rnd((2, 2), np.float64)] + ints + uints + [
        np.array([True, False, True]), special]
    yield "big_endian", 7, [rnd((2, 3), ">f4"), rnd((2, 3), ">f4"), rnd((3,), ">f8"), rnd((4,), ">f2"),
                            np.arange(5, dtype=">i8"), np.arange(3, dtype=">u2")]
    yield "fortran", 3, [np.asfortranarray(rnd((3, 4, 2), np.float32)), np.asfortranarray(rnd((2, 5), np.float64)), rnd((1, 4), np.float32)]
    yield "scalars_and_empty", 1, [np.array(1.5, np.float32), np.zeros((0,), np.float32), np.zeros((2, 0), np.float64), np.zeros((0, 3), np.float32), np.array(7, np.int64)]
    yield "many_tensors", 65536, [rnd((k % 7 + 1,), np.float32) for k in range(1203)]
    yield "huge_num_samples", 2 ** 40 + 3, [rnd((2,), np.float32)]
    yield "mid_num_samples", 70000, [rnd((300,), np.float32)]
    yield "num_samples_2_31", 2 ** 31, [rnd((2,), np.float32)]
    yield "one_tensor", 1, [rnd((2, 2), np.float32)]
    yield "high_rank", 5, [rnd((1, 2, 1, 2, 1, 2, 1, 2), np.float32)]
    yield "binbytes", 9, [rnd((300,), np.float32), rnd((64,), np.float32), rnd((63,), np.float32)]


def main():
    cmd = sys.argv[1]
    if cmd == "make":
        out = sys.argv[2]
        os.makedirs(out, exist_ok=True)
        rng = np.random.default_rng(5)
        manifest = {}
        for name, n, params in cases(rng):
            save_update(os.path.join(out, name + ".npy"), n, params)
            manifest[name] = describe(n, params)
        with open(os.path.join(out, "manifest.json"), "w") as f:
            json.dump(manifest, f)
        print("ok")
    elif cmd == "check":
        arr = np.load(sys.argv[2], allow_pickle=True)
        want = json.load(open(sys.argv[3]))
        # the published client's checks before it uploads
        assert arr.shape[0] == 2, arr.shape
        assert type(arr[0]) is int, type(arr[0])
        assert type(arr[1]) is list, type(arr[1])
        assert type(arr[1][0]) is np.ndarray, type(arr[1][0])
        assert arr[0] == want["num_samples"], (arr[0], want["num_samples"])
        assert len(arr[1]) == len(want["tensors"]), (len(arr[1]), len(want["tensors"]))
        for i, (p, w) in enumerate(zip(arr[1], want["tensors"])):
            got = describe(1, [p])["tensors"][0]
            for k in ("dtype", "shape", "fortran", "hex"):
                assert got[k] == w[k], f"tensor {i} {k}: numpy has {got[k]!r:.200}, expected {w[k]!r:.200}"
        print("ok")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
