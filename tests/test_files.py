"""Benchmark dataset files: tiny files in the real distributions' formats, read back.

Every fixture is written here with the standard library, NumPy, h5py, msgpack
and sqlite3 in the published layouts (IDX, CIFAR's Python 2 pickles, LEAF
JSON, FedJAX SQLite, TFF HDF5), independently of ``fedjax_kd.data.files``;
the tests then load them through ``fedjax_kd.data.benchmarks.load`` (and the
CLI) and check the pixels, labels, clients and errors.
"""

import gzip
import json
import os
import pickle
import sqlite3
import struct
import zlib

import h5py
import msgpack
import numpy as np
import pytest

from fedjax_kd import cli
from fedjax_kd.data import ClientData, CorruptFile, MissingFile, benchmarks, files, mnist1d

#: LEAF's ``models/utils/language_utils.py:ALL_LETTERS``, copied independently.
LEAF_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"

# ----------------------------------------------------------------------------- writers


def write_idx(path, array, type_code=8):
    """An IDX file: big-endian magic ``type*256 + ndim``, u32 sizes, big-endian data."""
    dtype = {8: ">u1", 12: ">i4", 13: ">f4"}[type_code]
    array = np.asarray(array)
    raw = struct.pack(">I", type_code << 8 | array.ndim)
    raw += struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(dtype).tobytes()
    path = str(path)
    if path.endswith(".gz"):
        raw = gzip.compress(raw)
    with open(path, "wb") as f:
        f.write(raw)


def idx_images(rng, n):
    """uint8 ``[n, 28, 28]`` non-symmetric images; image ``i`` has pixel ``[0, 0] == i``."""
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    x[:, 0, 0] = np.arange(n)
    x[:, 0, 1], x[:, 1, 0] = 7, 200  # never symmetric
    return x


MNIST_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def write_mnist(directory, *, gz=False, n_train=12, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": idx_images(rng, n_train),
        "y_train": rng.integers(0, 10, n_train).astype(np.uint8),
        "x_test": idx_images(rng, n_test),
        "y_test": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for key, name in MNIST_NAMES.items():
        write_idx(directory / (name + ".gz" * gz), arrays[key])
    return arrays


class Py2Pickler(pickle._Pickler):
    """Protocol 2, with every ``str`` and ``bytes`` written as a Python 2 ``str``.

    Python 2's cPickle wrote CIFAR's keys, file names and the array's raw data
    as 8-bit strings (``SHORT_BINSTRING`` / ``BINSTRING``), which Python 3 reads
    back as text only with ``encoding="latin1"``.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def cifar_planes(rng, n):
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(directory, n=2, seed=0):
    """``cifar-10-batches-py/data_batch_1..5, test_batch``, pickled as Python 2 did."""
    rng = np.random.default_rng(seed)
    folder = directory / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for i, name in enumerate([f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]):
        entry = {
            "batch_label": f"training batch {i + 1} of 5" if i < 5 else "testing batch 1 of 1",
            "labels": [int(v) for v in rng.integers(0, 10, n)],
            "data": cifar_planes(rng, n),
            "filenames": [f"img_{i}_{j}.png" for j in range(n)],
        }
        with open(folder / name, "wb") as f:
            Py2Pickler(f, protocol=2).dump(entry)
        batches[name] = entry
    return batches


def write_cifar100(directory, seed=0):
    """``cifar-100-python/train, test`` with fine and coarse labels (``pickle.dump``)."""
    rng = np.random.default_rng(seed)
    folder = directory / "cifar-100-python"
    folder.mkdir()
    out = {}
    for name, n in (("train", 6), ("test", 3)):
        entry = {
            "filenames": [f"{name}_{j}.png" for j in range(n)],
            "batch_label": f"{name}ing batch 1 of 1",
            "fine_labels": [int(v) for v in rng.integers(0, 100, n)],
            "coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
            "data": cifar_planes(rng, n),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        out[name] = entry
    return out


def write_leaf_json(path, user_data, hierarchies=None):
    users = list(user_data)
    content = {
        "users": users,
        "num_samples": [len(user_data[u]["y"]) for u in users],
        "user_data": user_data,
    }
    if hierarchies is not None:
        content["hierarchies"] = hierarchies
    path.write_text(json.dumps(content))


#: FEMNIST writers and their examples per split; train users spread over two files, unsorted.
FEMNIST_COUNTS = {
    "train": {"f_0002": 4, "f_0000": 3, "f_0003": 2, "f_0001": 1},
    "test": {"f_0001": 2, "f_0003": 1, "f_0000": 1, "f_0002": 2},
}


def femnist_client(rng, n):
    """LEAF FEMNIST examples: pixels ``k / 255`` as 784 floats, labels in 0..61."""
    k = rng.integers(0, 256, (n, 784))
    return {"x": (k / 255.0).tolist(), "y": [int(v) for v in rng.integers(0, 62, n)]}, k


def write_leaf_femnist(directory, seed=0):
    """``train/*.json`` (two files) and ``test/*.json``; returns ``{split: {user: (k, y)}}``."""
    rng = np.random.default_rng(seed)
    expected = {}
    for split, counts in FEMNIST_COUNTS.items():
        (directory / split).mkdir(parents=True)
        data, expected[split] = {}, {}
        for user, n in counts.items():
            data[user], k = femnist_client(rng, n)
            # Stored with the background 0 (FedJAX's 1 - pixels): 255 - k.
            expected[split][user] = ((255 - k).reshape(n, 28, 28).astype(np.uint8), data[user]["y"])
        users = list(counts)
        if split == "train":
            write_leaf_json(
                directory / split / "all_data_0_niid_0_keep_0_train_9.json",
                {u: data[u] for u in users[:2]},
            )
            write_leaf_json(
                directory / split / "all_data_1_niid_0_keep_0_train_9.json",
                {u: data[u] for u in users[2:]},
            )
        else:
            write_leaf_json(directory / split / "all_data_niid_0_keep_0_test_9.json", data)
    return expected


def expected_tokens(text):
    return np.array([LEAF_LETTERS.find(c) if c in LEAF_LETTERS else 80 for c in text])


def ext_pack(x):
    """FedJAX ``serialization._msgpack_ext_pack``: arrays as extension types 1 and 4."""
    if isinstance(x, np.ndarray) and x.dtype.hasobject:
        payload = msgpack.packb((x.shape, list(x.ravel())), use_bin_type=True)
        return msgpack.ExtType(4, payload)
    if isinstance(x, np.ndarray):
        payload = msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True)
        return msgpack.ExtType(1, payload)
    raise TypeError(f"cannot pack {type(x)}")


def write_fedjax_sqlite(path, clients):
    """``federated_data(client_id BLOB PRIMARY KEY, data BLOB, num_examples INTEGER)``."""
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, "
        "data BLOB NOT NULL, num_examples INTEGER NOT NULL)"
    )
    for cid, examples in clients:
        blob = zlib.compress(msgpack.packb(examples, default=ext_pack, strict_types=True))
        num = len(next(iter(examples.values())))
        db.execute("INSERT INTO federated_data VALUES (?, ?, ?)", (cid.encode(), blob, num))
    db.commit()
    db.close()


def femnist_records(rng, counts):
    """``[(client id, {"pixels": float32 [n, 28, 28], "label": int32 [n]})]`` and uint8 pixels."""
    records, pixels = [], {}
    for cid, n in counts.items():
        k = rng.integers(0, 256, (n, 28, 28))
        pixels[cid] = (255 - k).astype(np.uint8)  # background 0, as FedJAX's 1 - pixels
        label = rng.integers(0, 62, n).astype(np.int32)
        records.append((cid, {"pixels": (k / 255.0).astype(np.float32), "label": label}))
    return records, pixels


SNIPPETS = {
    "ALL_S_WELL_THAT_ENDS_WELL_HELENA": [
        "O, were that all! I think not on my father; And these great tears grace his "
        "remembrance more",
        "Than those I shed for him. What was he like? I have forgot him: my imagination~",
    ],
    "THE_TEMPEST_ARIEL": [
        "All hail, great master! grave sir, hail! I come To answer thy best pleasure; be't to "
        "fly, To swim, to dive into the fire",
    ],
}


def snippet_examples(snippets):
    """Every 80-character window of each snippet and the character after it (LEAF tokens)."""
    xs, ys = [], []
    for text in snippets:
        t = expected_tokens(text)
        for i in range(len(t) - 80):
            xs.append(t[i : i + 80])
            ys.append(t[i + 80])
    return np.array(xs).reshape(-1, 80), np.array(ys)


def write_h5(path, clients):
    with h5py.File(path, "w") as f:
        examples = f.create_group("examples")
        for cid, features in clients:
            group = examples.create_group(cid)
            for name, value in features.items():
                group.create_dataset(name, data=value)


# ----------------------------------------------------------------------------- helpers


def client_rows(ds, c):
    """Client ``c``'s real training examples ``(x, y)`` of a loaded dataset."""
    assert isinstance(ds.train, ClientData)
    n = int(ds.train.count[c])
    return np.asarray(ds.train.x[c, :n]), np.asarray(ds.train.y[c, :n])


def pooled(ds):
    """The (single) client's training examples of a ``num_clients=1, partition=iid`` load."""
    assert ds.num_clients == 1
    return client_rows(ds, 0)


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_mnist_idx_files(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    ds = benchmarks.load("mnist", str(tmp_path), num_clients=1, partition="iid")
    x, y = pooled(ds)
    assert ds.train.x.dtype == np.uint8 and ds.test_x.dtype == np.uint8
    assert ds.feature_shape == (28, 28) and ds.num_classes == 10
    np.testing.assert_array_equal(x, arrays["x_train"])
    np.testing.assert_array_equal(y, arrays["y_train"])
    np.testing.assert_array_equal(ds.test_x, arrays["x_test"])
    np.testing.assert_array_equal(ds.test_y, arrays["y_test"])
    assert ds.test_y.dtype == np.int32


def test_fashion_mnist_reads_the_same_names(tmp_path):
    arrays = write_mnist(tmp_path, gz=True, seed=5)
    ds = benchmarks.load("fashion_mnist", str(tmp_path), num_clients=3, partition="iid")
    assert ds.name == "fashion_mnist" and ds.num_clients == 3
    assert int(ds.train.count.sum()) == 12
    np.testing.assert_array_equal(ds.test_x, arrays["x_test"])


def write_emnist(directory, split, labels_from, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for part, n in (("train", 10), ("test", 3)):
        upright = idx_images(rng, n)
        labels = rng.integers(labels_from, labels_from + 26, n).astype(np.uint8)
        stem = directory / f"emnist-{split}-{part}"
        write_idx(f"{stem}-images-idx3-ubyte.gz", upright.transpose(0, 2, 1))  # as EMNIST stores
        write_idx(f"{stem}-labels-idx1-ubyte.gz", labels)
        out[part] = upright, labels
    return out


def test_emnist_letters_transposed_and_relabelled(tmp_path):
    arrays = write_emnist(tmp_path, "letters", labels_from=1)
    ds = benchmarks.load("emnist", str(tmp_path), split="letters", num_clients=1, partition="iid")
    assert ds.num_classes == 26 and ds.train.x.dtype == np.uint8
    x, y = pooled(ds)
    upright, labels = arrays["train"]
    assert not np.array_equal(upright, upright.transpose(0, 2, 1))
    np.testing.assert_array_equal(x, upright)
    np.testing.assert_array_equal(y, labels.astype(np.int32) - 1)
    assert y.min() >= 0 and y.max() <= 25
    np.testing.assert_array_equal(ds.test_x, arrays["test"][0])
    np.testing.assert_array_equal(ds.test_y, arrays["test"][1].astype(np.int32) - 1)


def test_emnist_digits_keeps_labels(tmp_path):
    rng = np.random.default_rng(1)
    upright, labels = idx_images(rng, 6), np.array([0, 9, 3, 3, 1, 2], np.uint8)
    for part in ("train", "test"):
        write_idx(
            tmp_path / f"emnist-digits-{part}-images-idx3-ubyte.gz", upright.transpose(0, 2, 1)
        )
        write_idx(tmp_path / f"emnist-digits-{part}-labels-idx1-ubyte.gz", labels)
    ds = benchmarks.load("emnist", str(tmp_path), num_clients=1, partition="iid")  # default split
    assert ds.num_classes == 10
    x, y = pooled(ds)
    np.testing.assert_array_equal(x, upright)
    np.testing.assert_array_equal(y, labels)


@pytest.mark.parametrize("type_code,dtype", [(12, ">i4"), (13, ">f4")])
def test_read_idx_wide_types_native_order(tmp_path, type_code, dtype):
    values = np.array([[1, -2, 70000], [2**31 - 1, -(2**31), 0]], np.float64)
    if type_code == 13:
        values = np.array([[1.5, -2.25, 1e30], [3.0e-5, -0.0, 7.0]])
    path = tmp_path / "values-idx2"
    write_idx(path, values, type_code)
    with open(path, "rb") as f:
        assert f.read(4) == bytes([0, 0, type_code, 2])  # the file really is big-endian IDX
    out = files.read_idx(path)
    assert out.dtype.isnative and out.dtype == np.dtype(dtype).newbyteorder("=")
    assert out.shape == (2, 3)
    np.testing.assert_array_equal(out, values.astype(dtype))


# ----------------------------------------------------------------------------- CIFAR


def chw_pixels(data):
    """CIFAR's rows ``[N, 3072]`` (R, G, B planes of 32x32) as ``[N, 32, 32, 3]``, by index."""
    n = len(data)
    out = np.empty((n, 32, 32, 3), np.uint8)
    for ch in range(3):
        for r in range(32):
            for c in range(32):
                out[:, r, c, ch] = data[:, ch * 1024 + r * 32 + c]
    return out


@pytest.mark.parametrize("inside", [False, True], ids=["parent_dir", "batches_dir"])
def test_cifar10_python2_pickles(tmp_path, inside):
    batches = write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        assert f.read(3) == b"\x80\x02}"  # protocol 2, a dict
    data_dir = tmp_path / "cifar-10-batches-py" if inside else tmp_path
    ds = benchmarks.load("cifar10", str(data_dir), num_clients=1, partition="iid")
    assert ds.num_classes == 10 and ds.feature_shape == (32, 32, 3)
    assert ds.train.x.dtype == np.uint8
    train = [batches[f"data_batch_{b}"] for b in range(1, 6)]
    x, y = pooled(ds)
    np.testing.assert_array_equal(x, chw_pixels(np.concatenate([e["data"] for e in train])))
    np.testing.assert_array_equal(y, np.concatenate([e["labels"] for e in train]))
    test = batches["test_batch"]
    np.testing.assert_array_equal(ds.test_x, chw_pixels(test["data"]))
    np.testing.assert_array_equal(ds.test_y, test["labels"])
    # one pixel by hand: image 1 of the test batch, row 3, column 30, green
    assert ds.test_x[1, 3, 30, 1] == test["data"][1, 1024 + 3 * 32 + 30]


@pytest.mark.parametrize("labels,classes", [("fine", 100), ("coarse", 20)])
def test_cifar100_fine_and_coarse(tmp_path, labels, classes):
    entries = write_cifar100(tmp_path)
    ds = benchmarks.load("cifar100", str(tmp_path), labels=labels, num_clients=1, partition="iid")
    assert ds.num_classes == classes
    x, y = pooled(ds)
    np.testing.assert_array_equal(x, chw_pixels(entries["train"]["data"]))
    np.testing.assert_array_equal(y, entries["train"][f"{labels}_labels"])
    np.testing.assert_array_equal(ds.test_y, entries["test"][f"{labels}_labels"])
    np.testing.assert_array_equal(ds.test_x, chw_pixels(entries["test"]["data"]))


# ----------------------------------------------------------------------------- LEAF


def test_leaf_femnist_natural_clients(tmp_path):
    expected = write_leaf_femnist(tmp_path)
    ds = benchmarks.load("femnist", str(tmp_path))
    users = sorted(FEMNIST_COUNTS["train"])
    assert ds.num_clients == 4 and ds.num_classes == 62
    assert ds.train.x.dtype == np.uint8 and ds.feature_shape == (28, 28)
    np.testing.assert_array_equal(ds.train.count, [FEMNIST_COUNTS["train"][u] for u in users])
    for c, user in enumerate(users):
        x, y = client_rows(ds, c)
        np.testing.assert_array_equal(x, expected["train"][user][0])
        np.testing.assert_array_equal(y, expected["train"][user][1])
    test_users = sorted(FEMNIST_COUNTS["test"])
    np.testing.assert_array_equal(
        ds.test_x, np.concatenate([expected["test"][u][0] for u in test_users])
    )
    np.testing.assert_array_equal(
        ds.test_y, np.concatenate([expected["test"][u][1] for u in test_users])
    )
    owner = [i for i, u in enumerate(test_users) for _ in range(FEMNIST_COUNTS["test"][u])]
    assert ds.test_client.dtype == np.int32
    np.testing.assert_array_equal(ds.test_client, owner)


def test_leaf_femnist_max_clients(tmp_path):
    expected = write_leaf_femnist(tmp_path)
    ds = benchmarks.load("femnist", str(tmp_path), max_clients=2)
    assert ds.num_clients == 2
    np.testing.assert_array_equal(ds.train.count, [3, 1])  # f_0000, f_0001
    # the test set keeps only those two clients' examples
    np.testing.assert_array_equal(
        ds.test_x, np.concatenate([expected["test"][u][0] for u in ("f_0000", "f_0001")])
    )
    np.testing.assert_array_equal(ds.test_client, [0, 1, 1])


def test_leaf_femnist_repartitioned(tmp_path):
    write_leaf_femnist(tmp_path)
    ds = benchmarks.load("femnist", str(tmp_path), partition="iid", num_clients=2)
    assert ds.num_clients == 2 and int(ds.train.count.sum()) == 10
    assert ds.train.x.dtype == np.uint8
    assert len(ds.test_client) == len(ds.test_y) == 6


def test_leaf_shakespeare_tokens(tmp_path):
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list(LEAF_LETTERS + "~\t"), 300))
    users = {
        "THE_TEMPEST_MIRANDA": [(text[i : i + 80], text[i + 80]) for i in range(0, 10)],
        "HAMLET_HAMLET": [(text[i : i + 80], text[i + 80]) for i in range(100, 103)],
    }
    text = text[:100] + "é" + text[101:]  # a character LEAF does not know
    users["A_LOVERS_COMPLAINT_MAID"] = [(text[i : i + 80], text[i + 80]) for i in range(30, 35)]
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        data = {u: {"x": [s for s, _ in ex], "y": [t for _, t in ex]} for u, ex in users.items()}
        hierarchies = ["The Tempest", "Hamlet", "A Lover's Complaint"]
        write_leaf_json(tmp_path / split / f"{split}.json", data, hierarchies)
    assert benchmarks.SHAKESPEARE_LETTERS == LEAF_LETTERS and len(LEAF_LETTERS) == 80
    ds = benchmarks.load("shakespeare", str(tmp_path))
    assert ds.num_classes == 81 and ds.train.x.dtype == np.int32 and ds.feature_shape == (80,)
    order = sorted(users)
    np.testing.assert_array_equal(ds.train.count, [len(users[u]) for u in order])
    for c, user in enumerate(order):
        x, y = client_rows(ds, c)
        np.testing.assert_array_equal(x, [expected_tokens(s) for s, _ in users[user]])
        np.testing.assert_array_equal(y, [expected_tokens(t)[0] for _, t in users[user]])
    x, _ = client_rows(ds, order.index("A_LOVERS_COMPLAINT_MAID"))
    assert (x == 80).any()  # é and ~ are token 80
    np.testing.assert_array_equal(ds.test_client, np.repeat(np.arange(3), [5, 3, 10]))


# ----------------------------------------------------------------------------- FedJAX SQLite


def test_fedjax_sqlite_femnist(tmp_path):
    rng = np.random.default_rng(0)
    counts = {"f0000_14": 3, "f0001_41": 2, "f0002_22": 5}
    train, train_px = femnist_records(rng, counts)
    test, test_px = femnist_records(rng, {"f0000_14": 1, "f0001_41": 2, "f0002_22": 1})
    write_fedjax_sqlite(tmp_path / "federated_emnist_train.sqlite", train)
    write_fedjax_sqlite(tmp_path / "federated_emnist_test.sqlite", test)
    ds = benchmarks.load("femnist", str(tmp_path), format="fedjax")
    assert ds.num_clients == 3 and ds.train.x.dtype == np.uint8
    np.testing.assert_array_equal(ds.train.count, [3, 2, 5])
    for c, (cid, features) in enumerate(train):
        x, y = client_rows(ds, c)
        np.testing.assert_array_equal(x, train_px[cid])
        np.testing.assert_array_equal(y, features["label"])
    np.testing.assert_array_equal(ds.test_x, np.concatenate([test_px[c] for c, _ in test]))
    np.testing.assert_array_equal(ds.test_y, np.concatenate([f["label"] for _, f in test]))
    np.testing.assert_array_equal(ds.test_client, [0, 1, 1, 2])


def test_fedjax_sqlite_shakespeare_snippets(tmp_path):
    clients = [
        (cid, {"snippets": np.array([s.encode() for s in snippets], dtype=object)})
        for cid, snippets in SNIPPETS.items()
    ]
    write_fedjax_sqlite(tmp_path / "shakespeare_train.sqlite", clients)
    write_fedjax_sqlite(tmp_path / "shakespeare_test.sqlite", clients[1:])
    ds = benchmarks.load("shakespeare", str(tmp_path), format="fedjax")
    assert ds.num_clients == 2 and ds.train.x.dtype == np.int32
    for c, snippets in enumerate(SNIPPETS.values()):
        want_x, want_y = snippet_examples(snippets)
        assert len(want_y) > 0
        x, y = client_rows(ds, c)
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)
    want_x, want_y = snippet_examples(SNIPPETS["THE_TEMPEST_ARIEL"])
    np.testing.assert_array_equal(ds.test_x, want_x)
    np.testing.assert_array_equal(ds.test_y, want_y)
    np.testing.assert_array_equal(ds.test_client, np.zeros(len(want_y)))


def test_fedjax_sqlite_shakespeare_client_without_snippets(tmp_path):
    """A client with no snippets is an empty client; the others keep int32 token ids."""
    clients = [
        (cid, {"snippets": np.array([s.encode() for s in snippets], dtype=object)})
        for cid, snippets in SNIPPETS.items()
    ]
    clients.append(("ZZ_SILENT_LORD", {"snippets": np.array([], dtype=object)}))
    write_fedjax_sqlite(tmp_path / "shakespeare_train.sqlite", clients)
    write_fedjax_sqlite(tmp_path / "shakespeare_test.sqlite", clients[:1])
    ds = benchmarks.load("shakespeare", str(tmp_path), format="fedjax")
    assert ds.train.x.dtype == np.int32 and ds.test_x.dtype == np.int32
    assert ds.num_clients == 3 and int(ds.train.count[2]) == 0


@pytest.mark.parametrize("folder", ["run #1", "data%20set"])
def test_fedjax_sqlite_in_a_folder_with_uri_characters(tmp_path, folder):
    """A data folder whose name has a URI's special characters ('#', '%') reads the same."""
    directory = tmp_path / folder
    directory.mkdir()
    rng = np.random.default_rng(0)
    train, train_px = femnist_records(rng, {"f0": 2, "f1": 1})
    test, _ = femnist_records(rng, {"f0": 1})
    write_fedjax_sqlite(directory / "federated_emnist_train.sqlite", train)
    write_fedjax_sqlite(directory / "federated_emnist_test.sqlite", test)
    before = sorted(p.name for p in tmp_path.iterdir())
    ds = benchmarks.load("femnist", str(directory), format="fedjax")
    np.testing.assert_array_equal(ds.train.count, [2, 1])
    np.testing.assert_array_equal(client_rows(ds, 0)[0], train_px["f0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no stray database file


# ----------------------------------------------------------------------------- TFF HDF5


def test_tff_h5_femnist_sorted_clients(tmp_path):
    rng = np.random.default_rng(0)
    counts = {"f3_09": 2, "f0_11": 3, "f1_00": 1}  # written unsorted
    train, train_px = femnist_records(rng, counts)
    test, test_px = femnist_records(rng, {"f1_00": 2, "f0_11": 1})
    write_h5(tmp_path / "fed_emnist_train.h5", train)
    write_h5(tmp_path / "fed_emnist_test.h5", test)
    ds = benchmarks.load("femnist", str(tmp_path), format="tff")
    order = sorted(counts)
    assert ds.num_clients == 3 and ds.train.x.dtype == np.uint8
    np.testing.assert_array_equal(ds.train.count, [counts[c] for c in order])
    labels = dict(train)
    for c, cid in enumerate(order):
        x, y = client_rows(ds, c)
        np.testing.assert_array_equal(x, train_px[cid])
        np.testing.assert_array_equal(y, labels[cid]["label"])
    np.testing.assert_array_equal(ds.test_x, np.concatenate([test_px["f0_11"], test_px["f1_00"]]))
    np.testing.assert_array_equal(ds.test_client, [0, 1, 1])


def test_tff_h5_cifar100(tmp_path):
    rng = np.random.default_rng(0)

    def records(counts):
        return [
            (
                cid,
                {
                    "image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                    "label": rng.integers(0, 100, n).astype(np.int64),
                    "coarse_label": rng.integers(0, 20, n).astype(np.int64),
                },
            )
            for cid, n in counts.items()
        ]

    train, test = records({"12": 2, "0": 3, "7": 1}), records({"1": 2, "0": 1})
    write_h5(tmp_path / "fed_cifar100_train.h5", train)
    write_h5(tmp_path / "fed_cifar100_test.h5", test)
    ds = benchmarks.load("cifar100_fed", str(tmp_path))
    assert ds.num_classes == 100 and ds.train.x.dtype == np.uint8
    assert ds.feature_shape == (32, 32, 3)
    by_id = dict(train)
    for c, cid in enumerate(sorted(by_id)):  # "0" < "12" < "7"
        x, y = client_rows(ds, c)
        np.testing.assert_array_equal(x, by_id[cid]["image"])
        np.testing.assert_array_equal(y, by_id[cid]["label"])
    tests = dict(test)
    np.testing.assert_array_equal(ds.test_y, np.concatenate([tests[c]["label"] for c in "01"]))
    np.testing.assert_array_equal(ds.test_client, [0, 1, 1])


def test_tff_h5_shakespeare_vlen_snippets(tmp_path):
    for split in ("train", "test"):
        with h5py.File(tmp_path / f"shakespeare_{split}.h5", "w") as f:
            for cid, snippets in SNIPPETS.items():
                f.create_dataset(
                    f"examples/{cid}/snippets",
                    data=[s.encode() for s in snippets],
                    dtype=h5py.string_dtype(),
                )
    ds = benchmarks.load("shakespeare", str(tmp_path), format="tff")
    assert ds.num_clients == 2
    for c, cid in enumerate(sorted(SNIPPETS)):
        x, y = client_rows(ds, c)
        want_x, want_y = snippet_examples(SNIPPETS[cid])
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)


# ----------------------------------------------------------------------------- errors


MISSING = [
    ("mnist", {}, "train-images-idx3-ubyte"),
    ("emnist", {"split": "balanced"}, "emnist-balanced-train-images-idx3-ubyte"),
    ("cifar10", {}, "cifar-10-batches-py"),
    ("cifar100", {}, "cifar-100-python"),
    ("femnist", {"format": "tff"}, "fed_emnist_train.h5"),
    ("femnist", {"format": "fedjax"}, "federated_emnist_train.sqlite"),
    ("shakespeare", {"format": "fedjax"}, "shakespeare_train.sqlite"),
    ("cifar100_fed", {}, "fed_cifar100_train.h5"),
]


@pytest.mark.parametrize("name,options,filename", MISSING)
def test_missing_file_says_what_where_and_from_where(tmp_path, name, options, filename):
    with pytest.raises(MissingFile) as info:
        benchmarks.load(name, str(tmp_path), **options)
    message = str(info.value)
    assert f"missing {filename}" in message
    assert "https://" in message
    assert str((tmp_path / filename).resolve()) in message


def test_missing_cifar_batch_inside_the_folder(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(MissingFile, match="missing data_batch_4: download it from https://"):
        benchmarks.load("cifar10", str(tmp_path))


def test_missing_leaf_folder_and_data_dir(tmp_path):
    with pytest.raises(MissingFile) as info:
        benchmarks.load("femnist", str(tmp_path))
    assert str((tmp_path / "train").resolve()) in str(info.value)
    assert "github.com/TalwalkarLab/leaf" in str(info.value)
    with pytest.raises(MissingFile, match="--config.data.dir"):
        benchmarks.load("mnist", "")


def test_cli_missing_file_is_one_error_line(tmp_path, capsys, no_run):
    code = cli.main(["run", "--config.data.name=mnist", f"--config.data.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "train-images-idx3-ubyte" in lines[0] and str(tmp_path) in lines[0]
    assert "Traceback" not in err


def test_cli_corrupt_file_is_one_error_line(tmp_path, capsys, no_run):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x04ab")
    code = cli.main(["run", "--config.data.name=mnist", f"--config.data.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "t10k-labels-idx1-ubyte" in lines[0]


def corrupt_gzip_stream(path):
    """A ``.gz`` whose deflate stream is damaged (a byte of the first block header flipped)."""
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0xFF
    path.write_bytes(bytes(raw))


def _idx_case(damage):
    def make(tmp_path):
        write_mnist(tmp_path, gz=damage.startswith("gz"))
        name = "train-images-idx3-ubyte" + ".gz" * damage.startswith("gz")
        path = tmp_path / name
        if damage == "truncated":
            path.write_bytes(path.read_bytes()[:-5])
        elif damage == "bad_magic":
            path.write_bytes(b"\x00\x00\x07\x03" + path.read_bytes()[4:])
        elif damage == "gz_truncated":
            path.write_bytes(path.read_bytes()[:-20])
        elif damage == "gz_not_gzip":
            path.write_bytes(gzip.decompress(path.read_bytes()))
        elif damage == "gz_stream":
            corrupt_gzip_stream(path)
        return "mnist", {}, name

    return make


def _cifar_case(garbage):
    def make(tmp_path):
        write_cifar10(tmp_path)
        path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
        if garbage == "truncated":
            path.write_bytes(path.read_bytes()[:1000])
        elif garbage == "not_a_dict":
            path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
        elif garbage == "no_labels":
            path.write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8)}, protocol=2))
        else:
            path.write_bytes(garbage)
        return "cifar10", {}, "data_batch_3"

    return make


def _leaf_case(content):
    def make(tmp_path):
        write_leaf_femnist(tmp_path)
        path = tmp_path / "train" / "all_data_1_niid_0_keep_0_train_9.json"
        path.write_text(content)
        return "femnist", {}, path.name

    return make


def _sqlite_case(kind):
    def make(tmp_path):
        rng = np.random.default_rng(0)
        train, _ = femnist_records(rng, {"a": 2})
        write_fedjax_sqlite(tmp_path / "federated_emnist_train.sqlite", train)
        path = tmp_path / "federated_emnist_test.sqlite"
        if kind == "garbage":
            path.write_bytes(b"this is not an sqlite database\n" * 100)
        elif kind == "no_table":
            db = sqlite3.connect(path)
            db.execute("CREATE TABLE other (x INTEGER)")
            db.commit()
            db.close()
        else:  # a client blob that is not zlib-compressed msgpack
            db = sqlite3.connect(path)
            db.execute(
                "CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, "
                "data BLOB NOT NULL, num_examples INTEGER NOT NULL)"
            )
            db.execute("INSERT INTO federated_data VALUES (?, ?, ?)", (b"a", b"\x00junk", 1))
            db.commit()
            db.close()
        return "femnist", {"format": "fedjax"}, path.name

    return make


def _h5_case(kind):
    def make(tmp_path):
        rng = np.random.default_rng(0)
        train, _ = femnist_records(rng, {"a": 2})
        path = tmp_path / "fed_emnist_train.h5"
        write_h5(tmp_path / "fed_emnist_test.h5", train)
        if kind == "garbage":
            path.write_bytes(b"\x89HDF not really" * 200)
        elif kind == "truncated":
            write_h5(path, train)
            path.write_bytes(path.read_bytes()[:600])
        elif kind == "no_examples":
            with h5py.File(path, "w") as f:
                f.create_dataset("pixels", data=np.zeros((2, 28, 28), np.float32))
        else:  # a client without its label
            with h5py.File(path, "w") as f:
                f.create_dataset("examples/a/pixels", data=np.zeros((2, 28, 28), np.float32))
        return "femnist", {"format": "tff"}, path.name

    return make


CORRUPT = {
    "idx_truncated": _idx_case("truncated"),
    "idx_bad_magic": _idx_case("bad_magic"),
    "idx_gz_truncated": _idx_case("gz_truncated"),
    "idx_gz_not_gzip": _idx_case("gz_not_gzip"),
    "idx_gz_damaged_stream": _idx_case("gz_stream"),
    "cifar_garbage": _cifar_case(b"\x93\x17garbage" * 50),
    "cifar_html": _cifar_case(b"<!DOCTYPE html><html>403 Forbidden</html>"),
    "cifar_text": _cifar_case(b"cifar-10 batch\nnot a pickle\n"),
    "cifar_random": _cifar_case(np.random.default_rng(0).bytes(4096)),
    "cifar_truncated": _cifar_case("truncated"),
    "cifar_not_a_dict": _cifar_case("not_a_dict"),
    "cifar_no_labels": _cifar_case("no_labels"),
    "leaf_invalid_json": _leaf_case('{"users": ["f_0003"], "user_data": {'),
    "leaf_no_user_data": _leaf_case('{"users": ["f_0003"], "num_samples": [1]}'),
    "leaf_no_y": _leaf_case('{"users": ["u"], "num_samples": [1], "user_data": {"u": {"x": []}}}'),
    "leaf_a_list": _leaf_case("[1, 2, 3]"),
    "sqlite_garbage": _sqlite_case("garbage"),
    "sqlite_no_table": _sqlite_case("no_table"),
    "sqlite_bad_blob": _sqlite_case("bad_blob"),
    "h5_garbage": _h5_case("garbage"),
    "h5_truncated": _h5_case("truncated"),
    "h5_no_examples": _h5_case("no_examples"),
    "h5_no_label": _h5_case("no_label"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_file_is_named(tmp_path, case):
    name, options, filename = CORRUPT[case](tmp_path)
    with pytest.raises(CorruptFile) as info:
        benchmarks.load(name, str(tmp_path), **options)
    assert filename in str(info.value)


def test_labels_out_of_range_are_corrupt(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 10, 2], np.uint8))
    with pytest.raises(CorruptFile, match=r"test labels in .* lie in \[0, 10\], outside \[0, 10\)"):
        benchmarks.load("mnist", str(tmp_path))


# ----------------------------------------------------------------------------- cache


def test_cache_serves_second_load_and_is_rebuilt_on_change(tmp_path, monkeypatch):
    arrays = write_mnist(tmp_path)
    first = benchmarks.load("mnist", str(tmp_path), num_clients=1, partition="iid")
    cache = list((tmp_path / ".fedjax_kd_cache").glob("*.npz"))
    assert [p.name for p in cache] == ["mnist.npz"]

    def forbidden(path):
        raise AssertionError(f"read {path} again instead of the cache")

    with monkeypatch.context() as m:
        m.setattr(files, "read_idx", forbidden)
        second = benchmarks.load("mnist", str(tmp_path), num_clients=1, partition="iid")
    np.testing.assert_array_equal(second.train.x, first.train.x)
    np.testing.assert_array_equal(second.train.y, first.train.y)
    np.testing.assert_array_equal(second.test_x, first.test_x)
    np.testing.assert_array_equal(second.test_y, first.test_y)

    # the same size, new pixels and labels, a later mtime: the cache is rebuilt
    new_x = 255 - arrays["x_test"]
    path = tmp_path / "t10k-images-idx3-ubyte"
    size = path.stat().st_size
    write_idx(path, new_x)
    write_idx(tmp_path / "train-labels-idx1-ubyte", (arrays["y_train"] + 1) % 10)
    assert path.stat().st_size == size
    for p in (path, tmp_path / "train-labels-idx1-ubyte"):
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    third = benchmarks.load("mnist", str(tmp_path), num_clients=1, partition="iid")
    np.testing.assert_array_equal(third.test_x, new_x)
    np.testing.assert_array_equal(pooled(third)[1], (arrays["y_train"] + 1) % 10)


def test_cache_of_a_natural_dataset(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    train, _ = femnist_records(rng, {"a": 2, "b": 3})
    test, _ = femnist_records(rng, {"a": 1})
    write_fedjax_sqlite(tmp_path / "federated_emnist_train.sqlite", train)
    write_fedjax_sqlite(tmp_path / "federated_emnist_test.sqlite", test)
    first = benchmarks.load("femnist", str(tmp_path), format="fedjax")
    assert (tmp_path / ".fedjax_kd_cache" / "femnist_fedjax.npz").exists()
    with monkeypatch.context() as m:
        m.setattr(files, "read_fedjax_sqlite", lambda path: pytest.fail(f"read {path}"))
        second = benchmarks.load("femnist", str(tmp_path), format="fedjax")
    np.testing.assert_array_equal(second.train.x, first.train.x)
    np.testing.assert_array_equal(second.train.count, first.train.count)
    np.testing.assert_array_equal(second.test_client, first.test_client)
    # one more client: rebuilt
    more, _ = femnist_records(rng, {"a": 2, "b": 3, "c": 4})
    (tmp_path / "federated_emnist_train.sqlite").unlink()
    write_fedjax_sqlite(tmp_path / "federated_emnist_train.sqlite", more)
    st = (tmp_path / "federated_emnist_train.sqlite").stat()
    os.utime(
        tmp_path / "federated_emnist_train.sqlite", ns=(st.st_atime_ns, st.st_mtime_ns + 10**10)
    )
    third = benchmarks.load("femnist", str(tmp_path), format="fedjax")
    np.testing.assert_array_equal(third.train.count, [2, 3, 4])


def test_leaf_cache_is_rebuilt_when_a_json_file_changes(tmp_path):
    write_leaf_femnist(tmp_path)
    benchmarks.load("femnist", str(tmp_path))
    assert list(tmp_path.rglob(".fedjax_kd_cache/*.npz"))
    rng = np.random.default_rng(9)
    data, _ = femnist_client(rng, 6)
    path = tmp_path / "train" / "all_data_1_niid_0_keep_0_train_9.json"
    write_leaf_json(path, {"f_0003": data})  # f_0003 now has 6 examples, f_0001 is gone
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**10))
    ds = benchmarks.load("femnist", str(tmp_path))
    np.testing.assert_array_equal(ds.train.count, [3, 4, 6])


# ----------------------------------------------------------------------------- MNIST-1D


@pytest.fixture(scope="module")
def mnist1d_default():
    from mnist1d.data import get_dataset_args, make_dataset

    return mnist1d.make_mnist1d(), make_dataset(get_dataset_args())


def test_mnist1d_matches_reference_default(mnist1d_default):
    (x, y, x_test, y_test), ref = mnist1d_default
    assert x.shape == (4000, 40) and x_test.shape == (1000, 40)
    assert x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_allclose(x, ref["x"].astype(np.float32), atol=1e-6)
    np.testing.assert_allclose(x_test, ref["x_test"].astype(np.float32), atol=1e-6)
    np.testing.assert_array_equal(y, ref["y"])
    np.testing.assert_array_equal(y_test, ref["y_test"])


def test_mnist1d_matches_reference_shuffled_variant():
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.shuffle_seq = 500, 3, True
    ref = make_dataset(args)
    x, y, x_test, y_test = mnist1d.make_mnist1d(500, seed=3, shuffle_seq=True)
    assert x.shape == (400, 40) and x_test.shape == (100, 40)
    np.testing.assert_allclose(x, ref["x"].astype(np.float32), atol=1e-6)
    np.testing.assert_allclose(x_test, ref["x_test"].astype(np.float32), atol=1e-6)
    np.testing.assert_array_equal(y, ref["y"])
    np.testing.assert_array_equal(y_test, ref["y_test"])


def test_mnist1d_templates_by_hand():
    raw = mnist1d.TEMPLATES
    assert raw.shape == (10, 12)
    t = mnist1d.templates()
    for row, out in zip(raw, t, strict=True):
        white = (row - row.mean()) / row.std()
        np.testing.assert_allclose(out, (white - white[0]) / 6, rtol=0, atol=1e-12)
    assert np.all(t[:, 0] == 0)
    # undoing the /6 and the shift gives the whitened rows: mean 0, std 1
    white = t * 6 - (t * 6).mean(1, keepdims=True)
    np.testing.assert_allclose(white.mean(1), 0.0, atol=1e-12)
    np.testing.assert_allclose(white.std(1), 1.0, atol=1e-12)
    expected = (raw - raw.mean(1, keepdims=True)) / raw.std(1, keepdims=True)
    np.testing.assert_allclose(white, expected, atol=1e-12)
    from mnist1d.data import get_templates

    np.testing.assert_allclose(t, get_templates()["x"], atol=1e-12)


def test_mnist1d_dataset_spec():
    ds = benchmarks.load(
        "mnist1d", "", num_samples=100, data_seed=7, num_clients=1, partition="iid"
    )
    x, y, x_test, y_test = mnist1d.make_mnist1d(100, seed=7)
    assert ds.train.x.dtype == np.float32 and ds.feature_shape == (40,)
    np.testing.assert_array_equal(pooled(ds)[0], x)
    np.testing.assert_array_equal(pooled(ds)[1], y)
    np.testing.assert_array_equal(ds.test_x, x_test)
    np.testing.assert_array_equal(ds.test_y, y_test)


# ----------------------------------------------------------------------------- end to end


def test_cli_runs_leaf_femnist(tmp_path, capsys):
    write_leaf_femnist(tmp_path)
    argv = ["run", "--no-progress", "--config.data.name=femnist", f"--config.data.dir={tmp_path}"]
    argv += ["--config.rounds=2", "--config.clients_per_round=2", "--config.eval_every=1"]
    argv += ["--config.client.epochs=1", "--config.client.batch_size=2"]
    argv += ["--config.model.student=mlp-8"]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "test_accuracy" in out
    summary = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert summary["rounds"] == 2
    assert 0.0 <= summary["test_accuracy"] <= 1.0


# ------------------------------------------------------------- review fixes


def test_a_damaged_cache_is_rebuilt(tmp_path):
    write_mnist(tmp_path)
    first = benchmarks.load("mnist", str(tmp_path), num_clients=1, partition="iid")
    (cache,) = (tmp_path / ".fedjax_kd_cache").glob("*.npz")
    cache.write_bytes(cache.read_bytes()[:300])  # cut short: not a zip file any more
    second = benchmarks.load("mnist", str(tmp_path), num_clients=1, partition="iid")
    np.testing.assert_array_equal(second.train.x, first.train.x)
    np.testing.assert_array_equal(second.test_y, first.test_y)


def test_a_directory_where_a_file_should_be_is_corrupt(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.unlink()
    batch.mkdir()
    with pytest.raises(CorruptFile, match="data_batch_1"):
        benchmarks.load("cifar10", str(tmp_path))
    write_leaf_femnist(tmp_path / "leaf")
    (tmp_path / "leaf" / "train" / "zz.json").mkdir()
    with pytest.raises(CorruptFile, match="zz.json"):
        benchmarks.load("femnist", str(tmp_path / "leaf"))


def test_misshapen_records_are_corrupt(tmp_path):
    with h5py.File(tmp_path / "fed_emnist_train.h5", "w") as f:
        f.create_dataset("examples/a", data=np.zeros(3))  # a dataset, not a client group
    with pytest.raises(CorruptFile, match="examples/a is not a client group"):
        files.read_tff_h5(tmp_path / "fed_emnist_train.h5")
    path = tmp_path / "x.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE federated_data (client_id BLOB PRIMARY KEY, data BLOB, "
            "num_examples INTEGER)"
        )
        db.execute(
            "INSERT INTO federated_data VALUES (?, ?, ?)",
            (b"a", zlib.compress(msgpack.packb([1, 2])), 2),
        )
    with pytest.raises(CorruptFile, match="not a dict of features"):
        files.read_fedjax_sqlite(path)


def test_femnist_pixels_not_784_long_are_corrupt(tmp_path):
    user = {"x": [[0.5] * 20], "y": [3]}
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    write_leaf_json(tmp_path / "train" / "a.json", {"u": user})
    write_leaf_json(tmp_path / "test" / "a.json", {"u": user})
    with pytest.raises(CorruptFile, match="784 pixels"):
        benchmarks.load("femnist", str(tmp_path))


def test_proxy_fraction_that_holds_no_example_is_one_error(tmp_path, capsys):
    write_leaf_femnist(tmp_path)  # clients of 1-3 examples: 5% of each is 0
    code = cli.main(
        ["run", "--no-progress", "--config.data.name=femnist", f"--config.data.dir={tmp_path}",
         "--config.algorithm.name=feddf", "--config.data.proxy_fraction=0.05",
         "--config.model.student=linear", "--config.rounds=1", "--config.clients_per_round=2"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: config key 'data.proxy_fraction'")


def test_user_arrays_stay_float_unless_compact():
    from fedjax_kd.data import from_arrays

    x = np.arange(40 * 3, dtype=np.uint8).reshape(40, 3)
    y = np.arange(40) % 2
    plain = from_arrays(x[:30], y[:30], x[30:], y[30:], num_clients=2)
    assert plain.train.x.dtype == np.float32 and plain.test_x.max() == x[30:].max()
    kept = from_arrays(x[:30], y[:30], x[30:], y[30:], num_clients=2, compact=True)
    assert kept.train.x.dtype == np.uint8
    tokens = from_arrays(x[:30].astype(np.int32), y[:30], x[30:].astype(np.int32), y[30:],
                         num_clients=2, compact=True)  # fmt: skip
    assert tokens.train.x.dtype == np.int32


def test_token_ids_beyond_the_vocabulary_are_one_error():
    from fedjax_kd import experiment
    from fedjax_kd.configs import default
    from fedjax_kd.data import from_arrays

    x = np.full((20, 5), 12, np.int32)  # token 12, but only 10 classes
    y = np.arange(20) % 10
    ds = from_arrays(x[:15], y[:15], x[15:], y[15:], num_classes=10, num_clients=2, compact=True)
    config = default.get_config()
    config.model.student = "transformer-8-1-2"
    with pytest.raises(experiment.ConfigError, match=r"token ids lie in \[\d+, 12\]"):
        experiment.build_algorithm(config, ds)
