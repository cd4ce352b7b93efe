"""The benchmark datasets of FL papers, from their standard local files, and MNIST-1D.

Selected by ``data.name`` with ``data.dir`` (the folder holding the files);
nothing is downloaded (:mod:`fedjax_kd.data.files` reads the formats). Two
kinds:

* **Pooled** (``mnist``, ``fashion_mnist``, ``emnist``, ``cifar10``,
  ``cifar100``, ``mnist1d``): the standard train/test split; any partitioner
  (``data.partition``) splits the training part over ``data.num_clients``.
* **Natural** (``femnist``, ``shakespeare``, ``cifar100_fed``,
  ``stackoverflow``): the files' own clients are the clients
  (``<name>.partition=natural``, the default), or their pooled training data
  is re-partitioned by a partitioner. Their test
  examples keep their client (``FederatedDataset.test_client``), so runs
  report per-client accuracy as the papers do. ``<name>.max_clients`` keeps
  the first clients (in the file's order) for a quick run.

Images are held as uint8 (a quarter of float32's memory) and scaled to
``[0, 1]`` inside the compiled round (``fedjax_kd.models.prepare_inputs``);
Shakespeare's characters are int32 token ids. Its task is LEAF's: the
character after each 80-character window. LEAF's JSON holds those windows;
TFF's and FedJAX's files hold a role's lines as ``snippets``, and each snippet
is windowed on its own (a snippet of 80 characters or fewer gives no example;
LEAF windows a role's whole text, so these files give fewer examples).

Layouts and sources: ``shared/REFERENCES_NEXT.md`` §F (torchvision's MNIST,
EMNIST and CIFAR readers, LEAF ``models/utils/model_utils.py`` and
``language_utils.py``, FedJAX ``datasets/{emnist,shakespeare}.py``, TFF
``simulation/datasets/{emnist,shakespeare,cifar100}.py``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from fedjax_kd.data import files
from fedjax_kd.data.datasets import from_arrays
from fedjax_kd.data.federated import FederatedDataset, pack_auto
from fedjax_kd.data.mnist1d import make_mnist1d
from fedjax_kd.data.partition import PARTITIONERS
from fedjax_kd.spec import DataContext, DatasetSpec, Hyper

__all__ = [
    "BENCHMARK_SPECS",
    "SHAKESPEARE_LETTERS",
    "char_tokens",
    "counted_vocabulary",
    "load",
    "stackoverflow_tokens",
    "stackoverflow_vocabulary",
]

#: LEAF's 80 Shakespeare characters (``models/utils/language_utils.py:ALL_LETTERS``);
#: token ``i`` is ``SHAKESPEARE_LETTERS[i]`` and token 80 stands for any other character
#: (LEAF's ``str.find`` would give -1).
SHAKESPEARE_LETTERS = (
    "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
)
_OOV = len(SHAKESPEARE_LETTERS)
_WINDOW = 80  # LEAF's SEQ_LENGTH: 80 characters in, the next one out

_GET = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/ (the 4 IDX files, as MNIST's "
    "page lists them)",
    "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist (data/fashion/)",
    "emnist": "https://www.nist.gov/itl/products-and-services/emnist-dataset "
    "(gzip.zip, unzipped: gzip/emnist-*-ubyte.gz)",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extracted)",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (extracted)",
    "femnist_tff": "https://storage.googleapis.com/tff-datasets-public/fed_emnist.tar.bz2 "
    "(extracted)",
    "femnist_fedjax": "https://storage.googleapis.com/gresearch/fedjax/emnist/",
    "shakespeare_tff": "https://storage.googleapis.com/tff-datasets-public/shakespeare.tar.bz2 "
    "(extracted)",
    "shakespeare_fedjax": "https://storage.googleapis.com/gresearch/fedjax/shakespeare/",
    "cifar100_fed": "https://storage.googleapis.com/tff-datasets-public/fed_cifar100.tar.bz2 "
    "(extracted)",
    "stackoverflow_tff": "https://storage.googleapis.com/tff-datasets-public/"
    "stackoverflow.tar.bz2 (extracted; the vocabulary from stackoverflow.word_count.tar.bz2 "
    "beside it)",
    "stackoverflow_fedjax": "https://storage.googleapis.com/gresearch/fedjax/stackoverflow/ "
    "(and stackoverflow.word_count)",
}

_EMNIST_CLASSES = {
    "byclass": 62,
    "bymerge": 47,
    "balanced": 47,
    "letters": 26,
    "digits": 10,
    "mnist": 10,
}


_LEAF = "LEAF's preprocess.sh (https://github.com/TalwalkarLab/leaf): its data/<dataset>/data/"


def _directory(ctx: DataContext, name: str) -> Path:
    if not ctx.data_dir:
        fmt = ctx.hp.get("format", "")
        get = _LEAF if fmt == "leaf" else _GET.get(f"{name}_{fmt}", _GET.get(name, "its site"))
        raise files.MissingFile(
            f"data.name={name} reads local files: set --config.data.dir=DIR to the folder "
            f"holding them (get them from {get})"
        )
    return Path(ctx.data_dir).expanduser()


# ---------------------------------------------------------------- pooled datasets


def _idx_arrays(directory: Path, name: str, emnist_split: str = "") -> dict:
    """Train/test images (uint8 ``[N, 28, 28]``) and labels of an IDX dataset."""
    if name == "emnist":
        stem = f"emnist-{emnist_split}-"
        names = {
            "x_train": stem + "train-images-idx3-ubyte",
            "y_train": stem + "train-labels-idx1-ubyte",
            "x_test": stem + "test-images-idx3-ubyte",
            "y_test": stem + "test-labels-idx1-ubyte",
        }
    else:
        names = {
            "x_train": "train-images-idx3-ubyte",
            "y_train": "train-labels-idx1-ubyte",
            "x_test": "t10k-images-idx3-ubyte",
            "y_test": "t10k-labels-idx1-ubyte",
        }
    paths = {k: files.find(directory, n, get=_GET[name]) for k, n in names.items()}

    def parse():
        out = {k: files.read_idx(p) for k, p in paths.items()}
        for split in ("train", "test"):
            x, y = out[f"x_{split}"], out[f"y_{split}"]
            if x.ndim != 3 or x.dtype != np.uint8:
                raise files.CorruptFile(
                    f"{paths[f'x_{split}']}: expected uint8 [N, rows, cols] images, got "
                    f"{x.dtype} {x.shape}"
                )
            if y.shape != (len(x),):
                raise files.CorruptFile(
                    f"{paths[f'y_{split}']}: {y.shape[0]} labels for {len(x)} images"
                )
            if name == "emnist":
                # EMNIST's IDX images are stored transposed (column-major): swap
                # their axes to MNIST's orientation; letters are labelled 1..26.
                out[f"x_{split}"] = np.ascontiguousarray(x.transpose(0, 2, 1))
                if emnist_split == "letters":
                    y = y - 1
            out[f"y_{split}"] = y.astype(np.int32)
        return out

    return files.cached(list(paths.values()), f"{name}{emnist_split}", parse)


def _cifar_folder(directory: Path, folder: str, name: str) -> Path:
    """``directory/folder`` (the extracted archive), or ``directory`` when it is that folder."""
    if directory.name == folder:
        return files.require(directory, get=_GET[name])
    return files.require(directory / folder, get=_GET[name])


def _cifar_arrays(directory: Path, name: str, labels: str = "fine") -> dict:
    """CIFAR-10 / CIFAR-100 train and test images (uint8 HWC) and labels."""
    if name == "cifar10":
        folder = _cifar_folder(directory, "cifar-10-batches-py", name)
        train = [files.require(folder / f"data_batch_{i}", get=_GET[name]) for i in range(1, 6)]
        test = [files.require(folder / "test_batch", get=_GET[name])]
        key = "labels"
    else:
        folder = _cifar_folder(directory, "cifar-100-python", name)
        train = [files.require(folder / "train", get=_GET[name])]
        test = [files.require(folder / "test", get=_GET[name])]
        key = f"{labels}_labels"

    def parse():
        out = {}
        for split, paths in (("train", train), ("test", test)):
            parts = [files.read_cifar(p, key) for p in paths]
            out[f"x_{split}"] = np.concatenate([x for x, _ in parts])
            out[f"y_{split}"] = np.concatenate([y for _, y in parts])
        return out

    return files.cached([*train, *test], f"{name}{labels if name == 'cifar100' else ''}", parse)


def _check_labels(ctx: DataContext, name: str, num_classes: int, **splits) -> None:
    """CorruptFile naming ``data.dir`` when a split's labels leave ``[0, num_classes)``.

    Per-position targets (``[N, T]``) may also be -1 (no target).
    """
    for split, y in splits.items():
        lowest = -1 if y.ndim > 1 else 0
        if y.size and (y.min() < lowest or y.max() >= num_classes):
            raise files.CorruptFile(
                f"{name} {split} labels in {ctx.data_dir} lie in [{y.min()}, {y.max()}], "
                f"outside [{lowest}, {num_classes})"
            )


def _pooled(ctx: DataContext, name: str, arrays: dict, num_classes: int) -> FederatedDataset:
    _check_labels(ctx, name, num_classes, train=arrays["y_train"], test=arrays["y_test"])
    return from_arrays(
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        name=name,
        num_classes=num_classes,
        num_clients=ctx.num_clients,
        partition=ctx.partition,
        seed=ctx.seed,
        proxy_fraction=ctx.proxy_fraction,
        compact=True,
        **ctx.partition_kwargs,
    )


def _build_idx(name: str):
    def build(ctx: DataContext) -> FederatedDataset:
        split = ctx.hp.get("split", "")
        arrays = _idx_arrays(_directory(ctx, name), name, split)
        classes = _EMNIST_CLASSES[split] if name == "emnist" else 10
        return _pooled(ctx, name, arrays, classes)

    return build


def _build_cifar(name: str):
    def build(ctx: DataContext) -> FederatedDataset:
        labels = ctx.hp.get("labels", "fine")
        arrays = _cifar_arrays(_directory(ctx, name), name, labels)
        classes = 10 if name == "cifar10" else (100 if labels == "fine" else 20)
        return _pooled(ctx, name, arrays, classes)

    return build


def _build_mnist1d(ctx: DataContext) -> FederatedDataset:
    hp = ctx.hp
    x, y, x_test, y_test = make_mnist1d(
        hp["num_samples"], seed=hp["data_seed"], shuffle_seq=hp["shuffle_seq"]
    )
    return _pooled(
        ctx, "mnist1d", {"x_train": x, "y_train": y, "x_test": x_test, "y_test": y_test}, 10
    )


# ---------------------------------------------------------------- natural datasets


_CHAR_IDS = {c: i for i, c in enumerate(SHAKESPEARE_LETTERS)}


def char_tokens(text: str) -> np.ndarray:
    """LEAF's character ids of ``text`` (int32), unknown characters as token 80."""
    return np.fromiter((_CHAR_IDS.get(c, _OOV) for c in text), np.int32, len(text))


def _windows(text: str) -> tuple[np.ndarray, np.ndarray]:
    """LEAF's examples of one text: every 80-character window and the character after it."""
    tokens = char_tokens(text)
    n = max(len(tokens) - _WINDOW, 0)
    if n == 0:
        return np.zeros((0, _WINDOW), np.int32), np.zeros(0, np.int32)
    x = np.lib.stride_tricks.sliding_window_view(tokens, _WINDOW)[:n]
    return np.ascontiguousarray(x), tokens[_WINDOW:].copy()


def _stack_clients(clients: list[tuple[str, np.ndarray, np.ndarray]], split: str) -> dict:
    """Concatenates ``(id, x, y)`` per client into ``{split}_x, _y, _counts, _ids``."""
    xs = [x for _, x, _ in clients]
    ys = [y for _, _, y in clients]
    if not xs:
        raise files.CorruptFile(f"the {split} split holds no clients")
    return {
        f"{split}_x": np.concatenate(xs),
        f"{split}_y": np.concatenate(ys).astype(np.int32),
        f"{split}_counts": np.array([len(y) for y in ys], np.int64),
        f"{split}_ids": np.array([cid for cid, _, _ in clients], dtype=str),
    }


def _to_pixels(x, source) -> np.ndarray:
    """FEMNIST's float pixels in ``[0, 1]`` as uint8 ``[N, 28, 28]``, ink bright.

    LEAF, TFF and FedJAX store dark ink on a white background (1.0); as
    FedJAX's ``preprocess_batch`` (``x = 1 - pixels``) and like MNIST and the
    EMNIST IDX files, the background becomes 0: ``255 - round(255 x)``. So a
    crop's zero padding is background too.
    """
    x = np.asarray(x, np.float64)
    if x.size % 784:
        raise files.CorruptFile(f"{source}: FEMNIST images have 784 pixels, got {x.shape}")
    x = x.reshape(-1, 28, 28)
    return (255 - np.rint(np.clip(x, 0.0, 1.0) * 255.0)).astype(np.uint8)


def _text_of(value) -> str:
    """A stored string as text; bytes that are not UTF-8 stay distinct (surrogate escapes)."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


def _leaf_clients(directory: Path, split: str, task: str) -> list:
    ids, user_data, _ = files.read_leaf_dir(directory / split)
    clients = []
    for cid in ids:
        raw = user_data[cid]
        if task == "femnist":
            x = _to_pixels(raw["x"], f"{directory / split}: client {cid!r}")
            x = x if len(x) else np.zeros((0, 28, 28), np.uint8)
            y = np.asarray(raw["y"], np.int64)
        else:  # shakespeare: x holds 80-character strings, y the next character
            rows = [char_tokens(s) for s in raw["x"]]
            x = np.stack(rows) if rows else np.zeros((0, _WINDOW), np.int32)
            if x.shape[1:] != (_WINDOW,):
                raise files.CorruptFile(
                    f"{directory / split}: client {cid!r} has inputs of {x.shape[1:]} "
                    f"characters, LEAF Shakespeare has {_WINDOW}"
                )
            y = np.array([char_tokens(c)[0] if c else _OOV for c in raw["y"]], np.int32)
        if len(x) != len(y):
            raise files.CorruptFile(
                f"{directory / split}: client {cid!r} has {len(x)} inputs and {len(y)} labels"
            )
        clients.append((cid, x, y))
    return clients


def _record_clients(records: list[tuple[str, dict]], task: str, source: Path) -> list:
    """TFF / FedJAX clients' feature dicts as ``(id, x, y)``."""
    clients = []
    for cid, features in records:
        try:
            if task == "femnist":
                x = _to_pixels(features["pixels"], f"{source}: client {cid!r}")
                y = np.asarray(features["label"], np.int64)
            elif task == "cifar100_fed":
                x = np.asarray(features["image"]).astype(np.uint8)
                y = np.asarray(features["label"], np.int64)
            else:  # shakespeare: each snippet windowed as LEAF windows a role's text
                parts = [_windows(_text_of(s)) for s in np.asarray(features["snippets"]).ravel()]
                parts.append((np.zeros((0, _WINDOW), np.int32), np.zeros(0, np.int32)))
                x = np.concatenate([p[0] for p in parts])
                y = np.concatenate([p[1] for p in parts])
        except KeyError as e:
            raise files.CorruptFile(f"{source}: client {cid!r} has no feature {e}") from None
        clients.append((cid, x, y))
    return clients


_NATURAL_FILES = {
    # (task, format): (train file, test file)
    ("femnist", "tff"): ("fed_emnist_train.h5", "fed_emnist_test.h5"),
    ("femnist", "fedjax"): ("federated_emnist_train.sqlite", "federated_emnist_test.sqlite"),
    ("shakespeare", "tff"): ("shakespeare_train.h5", "shakespeare_test.h5"),
    ("shakespeare", "fedjax"): ("shakespeare_train.sqlite", "shakespeare_test.sqlite"),
    ("cifar100_fed", "tff"): ("fed_cifar100_train.h5", "fed_cifar100_test.h5"),
}


def _natural_arrays(directory: Path, task: str, fmt: str) -> dict:
    """Both splits of a natural dataset, as concatenated arrays with per-client counts."""
    if fmt == "leaf":
        sources = []
        for split in ("train", "test"):
            found = sorted((directory / split).glob("*.json"))
            if not found:
                files.read_leaf_dir(directory / split)  # raises MissingFile with the hint
            sources.extend(found)

        def parse():
            return {
                **_stack_clients(_leaf_clients(directory, "train", task), "train"),
                **_stack_clients(_leaf_clients(directory, "test", task), "test"),
            }

        return files.cached(sources, f"{task}_leaf", parse)
    if (task, fmt) not in _NATURAL_FILES:
        formats = ["leaf"] * (task != "cifar100_fed") + [f for t, f in _NATURAL_FILES if t == task]
        raise ValueError(f"{task} has no {fmt!r} format; choose from {', '.join(formats)}")
    get = _GET[f"{task}_{fmt}" if f"{task}_{fmt}" in _GET else task]
    paths = [files.require(directory / n, get=get) for n in _NATURAL_FILES[task, fmt]]
    read = files.read_tff_h5 if fmt == "tff" else files.read_fedjax_sqlite

    def parse():
        out = {}
        for split, path in zip(("train", "test"), paths, strict=True):
            out.update(_stack_clients(_record_clients(read(path), task, path), split))
        return out

    return files.cached(paths, f"{task}_{fmt}", parse)


def _natural(
    ctx: DataContext, name: str, arrays: dict, num_classes: int, accuracy_ignore=()
) -> FederatedDataset:
    """A natural dataset's FederatedDataset (its clients, or re-partitioned)."""
    hp = ctx.hp
    counts = arrays["train_counts"]
    test_counts = arrays["test_counts"]
    ids, test_ids = arrays["train_ids"], arrays["test_ids"]
    x, y = arrays["train_x"], arrays["train_y"]
    test_x, test_y = arrays["test_x"], arrays["test_y"]
    keep = len(counts) if not hp["max_clients"] else min(hp["max_clients"], len(counts))
    if keep < len(counts):
        x, y = x[: counts[:keep].sum()], y[: counts[:keep].sum()]
        counts, ids = counts[:keep], ids[:keep]
        if np.isin(test_ids, ids).any():  # the same clients in both splits: keep theirs
            owner = np.repeat(np.arange(len(test_ids)), test_counts)
            rows = np.isin(owner, np.flatnonzero(np.isin(test_ids, ids)))
            test_x, test_y = test_x[rows], test_y[rows]
            test_counts = test_counts[np.isin(test_ids, ids)]
    _check_labels(ctx, name, num_classes, train=y, test=test_y)
    if not len(y):
        raise ValueError(f"{name}: the files hold no training examples")
    test_client = np.repeat(np.arange(len(test_counts), dtype=np.int32), test_counts)
    partition = hp["partition"]
    if partition == "natural":
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        parts = [np.arange(o, o + c) for o, c in zip(offsets, counts, strict=True)]
        proxy_x = None
        if ctx.proxy_fraction:
            # Each client's last examples, pooled, as the server's proxy set (as Synthetic).
            held = np.floor(ctx.proxy_fraction * counts).astype(np.int64)
            proxy_x = np.concatenate(
                [x[o + c - h : o + c] for o, c, h in zip(offsets, counts, held, strict=True)]
            )
            parts = [p[: len(p) - h] for p, h in zip(parts, held, strict=True)]
    else:
        if partition not in PARTITIONERS:
            raise ValueError(
                f"Unknown partition {partition!r}; choose from natural, {sorted(PARTITIONERS)}"
            )
        pooled = from_arrays(
            x,
            y,
            test_x,
            test_y,
            name=name,
            num_classes=num_classes,
            num_clients=ctx.num_clients,
            partition=partition,
            seed=ctx.seed,
            proxy_fraction=ctx.proxy_fraction,
            compact=True,
            accuracy_ignore=accuracy_ignore,
            **ctx.partition_kwargs,
        )
        return dataclasses.replace(pooled, test_client=test_client)
    return FederatedDataset(
        name=name,
        train=pack_auto(x, y, parts),
        test_x=np.ascontiguousarray(test_x),
        test_y=test_y.astype(np.int32),
        num_classes=num_classes,
        proxy_x=proxy_x,
        test_client=test_client,
        accuracy_ignore=accuracy_ignore,
    )


# ---------------------------------------------------------------- StackOverflow

#: StackOverflow's special token ids, as FedJAX's ``StackoverflowTokenizer``:
#: padding 0, beginning and end of sentence 1 and 2, the vocabulary's words
#: ``3 .. k + 2`` (most frequent first) and one out-of-vocabulary bucket ``k + 3``.
SO_PAD, SO_BOS, SO_EOS = 0, 1, 2

_SO_FILES = {
    "tff": ("stackoverflow_train.h5", "stackoverflow_test.h5"),
    "fedjax": ("stackoverflow_train.sqlite", "stackoverflow_test.sqlite"),
}
_SO_WORD_COUNT = "stackoverflow.word_count"


def stackoverflow_vocabulary(word_count_path, vocab_size: int) -> list[str]:
    """The first ``vocab_size`` words of a ``stackoverflow.word_count`` file.

    The file (TFF's ``stackoverflow.word_count.tar.bz2``, FedJAX's
    ``default_vocab``) has one ``word count`` line per word, most frequent
    first; the vocabulary is its first ``vocab_size`` words.
    """
    words = []
    try:
        with open(word_count_path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if len(words) == vocab_size:
                    break
                parts = line.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    raise files.CorruptFile(
                        f"{word_count_path}: line {number} is not 'word count': {line.strip()!r}"
                    )
                words.append(parts[0])
    except (OSError, UnicodeDecodeError) as e:
        raise files.CorruptFile(f"{word_count_path}: cannot be read ({e})") from None
    return words


def counted_vocabulary(sentences, vocab_size: int) -> list[str]:
    """The ``vocab_size`` most frequent words of ``sentences`` (ties: alphabetical).

    The fallback when no ``stackoverflow.word_count`` file is in ``data.dir``:
    top-k over the training clients read (with ``max_clients``, only theirs).
    """
    from collections import Counter

    counts = Counter(w for s in sentences for w in s.split(" ") if w)  # "" is no word
    ranked = sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))
    return [w for w, _ in ranked[:vocab_size]]


def stackoverflow_tokens(sentences, vocab: list[str], seq_len: int, oov: int | None = None):
    """Next-word examples of StackOverflow sentences, as FedJAX tokenizes them.

    Each sentence is split on single spaces; a word is ``3 + its rank`` in
    ``vocab`` or the out-of-vocabulary id ``oov`` (default ``3 + len(vocab)``;
    the dataset passes ``3 + vocab_size`` so that a shorter vocabulary keeps
    the ids of its classes); the sequence
    ``[BOS, words..., EOS]`` gives inputs ``x = seq[:-1]`` and targets
    ``y = seq[1:]``, truncated to ``seq_len`` and padded (``x`` with 0, ``y``
    with -1: no target) -- FedJAX ``datasets/stackoverflow.py``
    (``StackoverflowTokenizer.as_preprocess_batch``, whose padded ``y`` of 0
    its loss masks).

    Returns:
      int32 ``(x, y)``, each ``[len(sentences), seq_len]``.
    """
    index = {w: i + 3 for i, w in enumerate(vocab)}
    oov = 3 + len(vocab) if oov is None else oov
    x = np.full((len(sentences), seq_len), SO_PAD, np.int32)
    y = np.full((len(sentences), seq_len), -1, np.int32)
    for row, sentence in enumerate(sentences):
        seq = [SO_BOS, *(index.get(w, oov) for w in sentence.split(" ")), SO_EOS]
        n = min(len(seq) - 1, seq_len)
        x[row, :n] = seq[:n]
        y[row, :n] = seq[1 : n + 1]
    return x, y


def _so_sentences(records, source) -> list[tuple[str, list[str]]]:
    out = []
    for cid, features in records:
        if "tokens" not in features:
            raise files.CorruptFile(f"{source}: client {cid!r} has no feature 'tokens'")
        out.append((cid, [_text_of(t) for t in np.asarray(features["tokens"]).ravel()]))
    return out


def _stackoverflow_arrays(ctx: DataContext, directory: Path) -> dict:
    """StackOverflow's train and test clients, tokenized (cached per options).

    With ``max_clients`` only the first training clients (the file's order)
    are read, and only their test clients (the splits share user ids).
    """
    hp = ctx.hp
    fmt, limit = hp["format"], hp["max_clients"]
    get = _GET[f"stackoverflow_{fmt}"]
    paths = [files.require(directory / n, get=get) for n in _SO_FILES[fmt]]
    word_count = directory / _SO_WORD_COUNT
    sources = paths + ([word_count] if word_count.exists() else [])

    def read(path, **kw):
        if fmt == "tff":
            return _so_sentences(files.read_tff_h5(path, features=["tokens"], **kw), path)
        return _so_sentences(files.read_fedjax_sqlite(path, **kw), path)

    def parse():
        train = read(paths[0], limit=limit)
        test = read(paths[1], only=[cid for cid, _ in train] if limit else None)
        if not test:
            raise files.CorruptFile(
                f"{paths[1]}: none of the {len(train)} users read has test posts "
                "(raise stackoverflow.max_clients)"
            )
        if word_count.exists():
            vocab = stackoverflow_vocabulary(word_count, hp["vocab_size"])
        else:
            vocab = counted_vocabulary((s for _, ss in train for s in ss), hp["vocab_size"])
        out = {}
        for split, clients in (("train", train), ("test", test)):
            rows = [
                (cid, *stackoverflow_tokens(ss, vocab, hp["seq_len"], oov=3 + hp["vocab_size"]))
                for cid, ss in clients
            ]
            out.update(_stack_clients(rows, split))
        return out

    key = f"stackoverflow_{fmt}_{limit}_{hp['vocab_size']}_{hp['seq_len']}"
    return files.cached(sources, key, parse)


def _build_stackoverflow(ctx: DataContext) -> FederatedDataset:
    directory = _directory(ctx, "stackoverflow")
    arrays = _stackoverflow_arrays(ctx, directory)
    k = ctx.hp["vocab_size"]
    # Vocabulary k words + PAD, BOS, EOS and one OOV bucket; accuracy skips EOS and OOV.
    return _natural(ctx, "stackoverflow", arrays, k + 4, accuracy_ignore=(SO_EOS, k + 3))


def _build_natural(name: str, num_classes: int):
    def build(ctx: DataContext) -> FederatedDataset:
        arrays = _natural_arrays(_directory(ctx, name), name, ctx.hp["format"])
        return _natural(ctx, name, arrays, num_classes)

    return build


def load(name: str, data_dir: str, **options) -> FederatedDataset:
    """A benchmark dataset by ``data.name`` outside the CLI (the spec's defaults, then ``options``).

    Args:
      name: a key of :data:`BENCHMARK_SPECS` (``mnist``, ``femnist``, ...).
      data_dir: the folder holding its files ("" for ``mnist1d``).
      **options: the spec's options (``split="letters"``, ``max_clients=10``)
        and ``num_clients``, ``partition``, ``seed``, ``proxy_fraction`` and the
        partitioner's arguments (``alpha=0.5``).
    """
    spec = BENCHMARK_SPECS[name]
    hp = {**spec.defaults(), **{k: options.pop(k) for k in list(options) if k in spec.hypers}}
    ctx = DataContext(
        hp=hp,
        num_clients=options.pop("num_clients", 100),
        partition=options.pop("partition", "iid"),
        partition_kwargs=options.pop("partition_kwargs", {}),
        seed=options.pop("seed", 0),
        proxy_fraction=options.pop("proxy_fraction", 0.0),
        data_dir=data_dir,
    )
    if options:
        raise ValueError(f"unknown options for {name}: {sorted(options)}")
    return spec.build(ctx)


def _natural_hypers(formats: tuple[str, ...]) -> dict:
    return {
        "format": Hyper(formats[0], "the files' format", choices=formats),
        "max_clients": Hyper(
            0,
            "keep the first N clients (file order); 0 = all",
            check=lambda v: v >= 0,
            allowed=">= 0",
        ),
        "partition": Hyper(
            "natural",
            "natural (the files' clients) or a partitioner over the pooled training data",
            choices=("natural", *PARTITIONERS),
        ),
    }


#: The benchmark datasets' specs by ``data.name`` (merged into ``fedjax_kd.data.DATASET_SPECS``).
BENCHMARK_SPECS = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "mnist1d",
            "MNIST-1D (Greydanus & Kobak 2024), generated: 4,000/1,000 40-point signals",
            _build_mnist1d,
            hypers={
                "num_samples": Hyper(
                    5000, "examples in all (80% train)", check=lambda v: v >= 10, allowed=">= 10"
                ),
                "data_seed": Hyper(42, "the generator's seed (reference: 42)"),
                "shuffle_seq": Hyper(
                    False, "shuffled MNIST-1D (one fixed permutation of positions)"
                ),
            },
        ),
        DatasetSpec("mnist", "MNIST from its IDX files in data.dir", _build_idx("mnist")),
        DatasetSpec(
            "fashion_mnist",
            "Fashion-MNIST from its IDX files in data.dir",
            _build_idx("fashion_mnist"),
        ),
        DatasetSpec(
            "emnist",
            "EMNIST from its IDX files in data.dir (transposed to MNIST's orientation)",
            _build_idx("emnist"),
            hypers={"split": Hyper("digits", "EMNIST split", choices=tuple(_EMNIST_CLASSES))},
        ),
        DatasetSpec(
            "cifar10", "CIFAR-10 from its Python pickles in data.dir", _build_cifar("cifar10")
        ),
        DatasetSpec(
            "cifar100",
            "CIFAR-100 from its Python pickles in data.dir",
            _build_cifar("cifar100"),
            hypers={
                "labels": Hyper(
                    "fine", "fine (100) or coarse (20) labels", choices=("fine", "coarse")
                )
            },
        ),
        DatasetSpec(
            "femnist",
            "FEMNIST (62 classes), its writers as clients: LEAF JSON, TFF HDF5 or FedJAX SQLite",
            _build_natural("femnist", 62),
            hypers=_natural_hypers(("leaf", "tff", "fedjax")),
            partition_option="partition",
            own_clients=True,
        ),
        DatasetSpec(
            "shakespeare",
            "Shakespeare next character after 80, speaking roles as clients: LEAF, TFF, FedJAX",
            _build_natural("shakespeare", _OOV + 1),
            hypers=_natural_hypers(("leaf", "tff", "fedjax")),
            partition_option="partition",
            own_clients=True,
        ),
        DatasetSpec(
            "stackoverflow",
            "StackOverflow next word (top-k words), its users as clients: TFF HDF5 or FedJAX",
            _build_stackoverflow,
            hypers={
                **_natural_hypers(("tff", "fedjax")),
                "vocab_size": Hyper(
                    10000, "words in the vocabulary (k)", check=lambda v: v >= 1, allowed=">= 1"
                ),
                "seq_len": Hyper(
                    20,
                    "tokens per example (truncated, padded)",
                    check=lambda v: v >= 1,
                    allowed=">= 1",
                ),
            },
            partition_option="partition",
            own_clients=True,
        ),
        DatasetSpec(
            "cifar100_fed",
            "TFF's federated CIFAR-100 (500 train / 100 test clients) from its HDF5 files",
            _build_natural("cifar100_fed", 100),
            hypers=_natural_hypers(("tff",)),
            partition_option="partition",
            own_clients=True,
        ),
    )
}
