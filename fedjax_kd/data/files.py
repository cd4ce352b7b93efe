"""Readers for the standard files of FL benchmark datasets (local files only).

Nothing here downloads: every reader takes a local path, and a missing file is
a :class:`MissingFile` saying which file, where to get it and where to put
it; a corrupt or truncated file is a :class:`CorruptFile` naming it. Formats
(layouts as in ``shared/REFERENCES_NEXT.md`` §F):

* **IDX** (MNIST, Fashion-MNIST, EMNIST; LeCun's format as read by
  torchvision ``datasets/mnist.py``): big-endian ``magic = type*256 + ndim``
  (type 8 = u8, 9 = i8, 11 = >i2, 12 = >i4, 13 = >f4, 14 = >f8), ``ndim``
  u32 sizes, then the data; plain, ``.gz`` or ``.xz``.
* **CIFAR pickles** (``cifar-10-batches-py``, ``cifar-100-python``): Python 2
  pickles (read with ``encoding="latin1"``), ``data`` uint8 ``[N, 3072]`` as
  R, G, B planes, ``labels`` (CIFAR-10) or ``fine_labels``/``coarse_labels``
  (CIFAR-100).
* **LEAF JSON** (``TalwalkarLab/leaf`` ``models/utils/model_utils.py``):
  ``{"users", "num_samples", "user_data": {u: {"x", "y"}}, ["hierarchies"]}``;
  a split's ``*.json`` files are merged and clients sorted by id.
* **FedJAX SQLite** (``fedjax/core/sqlite_federated_data.py``,
  ``serialization.py``): table ``federated_data(client_id BLOB PRIMARY KEY,
  data BLOB, num_examples INTEGER)``, ``data`` =
  ``zlib.compress(msgpack.packb(examples))`` with NumPy arrays as msgpack
  extension type 1 (``(shape, dtype name, C-order bytes)``), 3 (a scalar as
  a 0-d array) and 4 (a bytes array: ``(shape, flat list of bytes)``);
  clients in ``rowid`` order.
* **TFF HDF5** (``tensorflow_federated`` ``hdf5_client_data.py``): group
  ``/examples/<client id>/<feature>``, clients in sorted order.

Parsed arrays are cached next to the source (:func:`cached`) so a second
load is fast; the cache is keyed by each source file's path, size and
modification time, so it is rebuilt when a source changes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import pickle
import sqlite3
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "CorruptFile",
    "MissingFile",
    "cached",
    "read_cifar",
    "read_fedjax_sqlite",
    "read_idx",
    "read_leaf_dir",
    "read_tff_h5",
    "require",
]

_CACHE_DIR = ".fedjax_kd_cache"
_CACHE_VERSION = 1


class MissingFile(ValueError):
    """A dataset file is not where it should be (the message says how to get it)."""


class CorruptFile(ValueError):
    """A dataset file exists but cannot be parsed (the message names it)."""


def require(path: str | os.PathLike, *, get: str) -> Path:
    """``path`` if it exists, else :class:`MissingFile`: which file, where to get it, where.

    Args:
      path: the file (or directory) that must exist.
      get: where to get it (a URL or a short instruction).
    """
    path = Path(path)
    if not path.exists():
        raise MissingFile(
            f"missing {path.name}: download it from {get} and put it at {path.resolve()}"
        )
    return path


def find(directory: str | os.PathLike, name: str, *, get: str) -> Path:
    """``directory/name``, or its ``.gz`` / ``.xz`` variant; :class:`MissingFile` if none."""
    directory = Path(directory)
    for candidate in (name, name + ".gz", name + ".xz"):
        if (directory / candidate).exists():
            return directory / candidate
    return require(directory / name, get=get)


def _open(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".xz":
        return lzma.open(path, "rb")
    return open(path, "rb")


_IDX_TYPES = {8: ">u1", 9: ">i1", 11: ">i2", 12: ">i4", 13: ">f4", 14: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (plain, ``.gz`` or ``.xz``) as a NumPy array in native byte order.

    Raises:
      CorruptFile: a bad magic number, or fewer bytes than the header promises.
    """
    path = Path(path)
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        raise CorruptFile(f"{path}: cannot read ({e})") from None
    if len(raw) < 4:
        raise CorruptFile(f"{path}: not an IDX file (only {len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    kind, ndim = magic >> 8, magic & 0xFF
    if magic >> 16 != 0 or kind not in _IDX_TYPES or not 1 <= ndim <= 3:
        raise CorruptFile(f"{path}: not an IDX file (magic number {magic:#010x})")
    header = 4 * (ndim + 1)
    if len(raw) < header:
        raise CorruptFile(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 * (i + 1) : 4 * (i + 2)], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[kind])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise CorruptFile(
            f"{path}: truncated or padded IDX data: {len(raw) - header} bytes for shape "
            f"{shape}, expected {expected}"
        )
    data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except (
        OSError,
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        ImportError,
        IndexError,
        KeyError,
    ) as e:
        raise CorruptFile(f"{path}: not a CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(entry, dict):
        raise CorruptFile(f"{path}: not a CIFAR pickle (holds {type(entry).__name__})")
    return entry


def read_cifar(path: str | os.PathLike, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file: uint8 ``[N, 32, 32, 3]`` images (HWC) and int32 labels.

    Args:
      path: e.g. ``cifar-10-batches-py/data_batch_1`` or ``cifar-100-python/train``.
      label_key: ``labels`` (CIFAR-10), ``fine_labels`` or ``coarse_labels`` (CIFAR-100).
    """
    path = Path(path)
    entry = _unpickle(path)
    if "data" not in entry or label_key not in entry:
        raise CorruptFile(f"{path}: a CIFAR batch needs 'data' and {label_key!r}")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise CorruptFile(f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise CorruptFile(f"{path}: {len(labels)} labels for {len(data)} images")
    images = data.reshape(len(data), 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def read_leaf_dir(directory: str | os.PathLike) -> tuple[list[str], dict, list]:
    """A LEAF split directory: sorted client ids, merged ``user_data`` and hierarchies.

    As LEAF's ``read_dir``: every ``*.json`` file is read, ``user_data`` merged,
    clients sorted by id; ``hierarchies`` (e.g. Shakespeare's plays) are
    appended in file order and returned as they are.

    Raises:
      MissingFile: no JSON file in the directory.
      CorruptFile: a file that is not LEAF JSON.
    """
    directory = Path(directory)
    files = sorted(directory.glob("*.json")) if directory.is_dir() else []
    if not files:
        raise MissingFile(
            f"no LEAF *.json files in {directory.resolve()}: run LEAF's preprocess.sh "
            "(https://github.com/TalwalkarLab/leaf) and put its data/<dataset>/data/<split>/ "
            "files there"
        )
    user_data: dict = {}
    hierarchies: list = []
    for path in files:
        try:
            with open(path) as f:
                content = json.load(f)
            users, data = content["users"], content["user_data"]
            for u in users:
                data[u]["x"], data[u]["y"]  # noqa: B018 (checks that both exist)
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise CorruptFile(f"{path}: not valid JSON ({e})") from None
        except (KeyError, TypeError) as e:
            raise CorruptFile(f"{path}: not LEAF JSON (missing {e})") from None
        user_data.update(data)
        hierarchies.extend(content.get("hierarchies", []))
    return sorted(user_data), user_data, hierarchies


def _ext_hook(code: int, payload: bytes):
    import msgpack

    if code in (1, 3):
        shape, dtype_name, buffer = msgpack.unpackb(payload, raw=True)
        name = dtype_name.decode()
        if name == "bfloat16":
            import ml_dtypes

            dtype = np.dtype(ml_dtypes.bfloat16)
        else:
            dtype = np.dtype(name)
        value = np.frombuffer(buffer, dtype).reshape(shape)
        return value[()] if code == 3 else value
    if code == 2:
        re, im = msgpack.unpackb(payload)
        return complex(re, im)
    if code == 4:
        shape, items = msgpack.unpackb(payload, raw=True)
        return np.array(items, dtype=object).reshape(shape)
    return msgpack.ExtType(code, payload)


def read_fedjax_sqlite(
    path: str | os.PathLike, *, limit: int = 0, only: Sequence[str] | None = None
) -> list[tuple[str, dict]]:
    """A FedJAX federated SQLite file: ``[(client id, {feature: array})]`` in rowid order.

    Args:
      path: the ``.sqlite`` file.
      limit: read only the first ``limit`` clients (0 = all): StackOverflow's
        342k clients need not all be decoded for a subsampled run.
      only: read only these client ids (those present; in rowid order).

    Raises:
      CorruptFile: not an SQLite file, no ``federated_data`` table, or a
        client blob that does not decode.
    """
    import msgpack

    path = Path(path)
    query = "SELECT client_id, data, num_examples FROM federated_data"
    args: tuple = ()
    if only is not None:
        # Only the rows asked for are fetched (StackOverflow's test file of 204k users).
        wanted_ids = [str(c).encode() for c in only]
        db_ids = ",".join("?" * len(wanted_ids))
        query += f" WHERE client_id IN ({db_ids}) OR CAST(client_id AS TEXT) IN ({db_ids})"
        args = (*wanted_ids, *(c.decode() for c in wanted_ids))
    query += " ORDER BY rowid"
    if limit:
        query += f" LIMIT {int(limit)}"
    try:
        # A file: URI (read-only), percent-encoded so '#', '?' or '%' in the path stay the path.
        with sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True) as db:
            rows = db.execute(query, args).fetchall() if args or only is None else []
    except sqlite3.Error as e:
        raise CorruptFile(f"{path}: not a FedJAX SQLite file ({e})") from None
    wanted = None if only is None else set(only)
    clients = []
    for client_id, blob, num in rows:
        cid = client_id.decode() if isinstance(client_id, bytes) else str(client_id)
        if wanted is not None and cid not in wanted:
            continue
        try:
            examples = msgpack.unpackb(zlib.decompress(blob), ext_hook=_ext_hook, raw=False)
        except (zlib.error, ValueError, TypeError, msgpack.UnpackException) as e:
            raise CorruptFile(f"{path}: client {cid!r} does not decode ({e})") from None
        if not isinstance(examples, dict):
            raise CorruptFile(f"{path}: client {cid!r} is not a dict of features")
        lengths = {len(v) if hasattr(v, "__len__") else -1 for v in examples.values()}
        if lengths != {num}:
            raise CorruptFile(f"{path}: client {cid!r} has {sorted(lengths)} rows, says {num}")
        clients.append((cid, examples))
    return clients


def read_tff_h5(
    path: str | os.PathLike,
    *,
    limit: int = 0,
    only: Sequence[str] | None = None,
    features: Sequence[str] | None = None,
) -> list[tuple[str, dict]]:
    """A TFF HDF5 client-data file: ``[(client id, {feature: array})]``, ids sorted.

    Args:
      path: the ``.h5`` file.
      limit: read only the first ``limit`` clients in sorted order (0 = all).
      only: read only these client ids (those present; sorted).
      features: read only these features (default all).

    Raises:
      CorruptFile: not an HDF5 file, no ``examples`` group, a client that is
        not a group, a feature that is not an array, or a requested feature
        missing.
    """
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "examples" not in f:
                raise CorruptFile(f"{path}: no 'examples' group (not a TFF HDF5 client file)")
            group = f["examples"]
            ids = sorted(group) if only is None else sorted(set(only) & set(group))
            clients = []
            for cid in ids[:limit] if limit else ids:
                if not isinstance(group[cid], h5py.Group):
                    raise CorruptFile(f"{path}: examples/{cid} is not a client group")
                items = list(group[cid].items())
                if features is not None:
                    missing = set(features) - set(group[cid])
                    if missing:
                        raise CorruptFile(
                            f"{path}: client {cid!r} has no feature {sorted(missing)[0]!r}"
                        )
                    items = [(n, group[cid][n]) for n in features]
                for name, data in items:
                    if not isinstance(data, h5py.Dataset):
                        raise CorruptFile(f"{path}: examples/{cid}/{name} is not an array")
                clients.append((cid, {name: np.asarray(data[()]) for name, data in items}))
            return clients
    except OSError as e:
        raise CorruptFile(f"{path}: not an HDF5 file ({e})") from None


def _parser_version() -> str:
    """A hash of the parsers' source (this module and the dataset builders): a parsing
    change rebuilds every cache."""
    here = Path(__file__).parent
    text = b"".join((here / n).read_bytes() for n in ("files.py", "benchmarks.py"))
    return hashlib.sha256(text).hexdigest()[:16]


def _stamp(sources: Sequence[Path], key: str) -> str:
    parts = [str(_CACHE_VERSION), _parser_version(), key]
    for s in sources:
        st = s.stat()
        parts.append(f"{s.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cached(
    sources: Sequence[str | os.PathLike], key: str, parse: Callable[[], dict]
) -> dict[str, np.ndarray]:
    """``parse()``'s arrays, cached as ``.npz`` next to the first source.

    The cache file ``<dir>/.fedjax_kd_cache/<key>.npz`` stores a stamp of every
    source's path, size and modification time and of the parsers' source code;
    a cache whose stamp differs (a source or the parser changed) is rebuilt. A
    file replaced by one of the same size and modification time (``cp -p``)
    is not noticed: delete the cache folder then. A directory that cannot be
    written is read without a cache.

    Args:
      sources: the files ``parse`` reads (their changes invalidate the cache).
      key: a file-name-safe name of what is parsed (e.g. ``mnist``).
      parse: returns ``{name: array}`` (numeric arrays only).
    """
    sources = [Path(s) for s in sources]
    stamp = _stamp(sources, key)
    cache = sources[0].parent / _CACHE_DIR / f"{key}.npz"
    if cache.exists():
        try:
            with np.load(cache) as z:
                if str(z["__stamp__"]) == stamp:
                    return {k: z[k] for k in z.files if k != "__stamp__"}
        except (OSError, ValueError, KeyError, EOFError, zlib.error, zipfile.BadZipFile):
            pass  # an unreadable cache is rebuilt
    arrays = parse()
    try:
        cache.parent.mkdir(exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")  # one per process
        np.savez(tmp, __stamp__=np.array(stamp), **arrays)
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only data directory: no cache
    return arrays
