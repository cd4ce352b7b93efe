"""StackOverflow next-word prediction from tiny files in TFF's and FedJAX's layouts.

The files are written with h5py / sqlite3 + msgpack (``test_files``' writers,
independent of ``fedjax_kd.data.files``); the expected tokens come from a
plain re-statement of FedJAX's ``StackoverflowTokenizer`` below (PAD 0, BOS 1,
EOS 2, word of rank r -> 3 + r, OOV -> 3 + k; ``[BOS] + words + [EOS]``,
``x = seq[:-1]``, ``y = seq[1:]``, truncated and padded to the sequence length).
"""

import json

import h5py
import numpy as np
import pytest
from test_files import client_rows, write_fedjax_sqlite

from fedjax_kd import cli, experiment
from fedjax_kd.configs import default as default_config
from fedjax_kd.data import CorruptFile, MissingFile, benchmarks

#: Two users' posts in each split (the splits share user ids, as TFF's do).
TRAIN = {
    "00000001": ["how do i sort a list in python", "the list is empty", "sort it"],
    "00000007": ["what is a pointer", "a pointer to a pointer"],
    "00000003": ["use numpy"],
}
TEST = {
    "00000001": ["sort a dict", "python is slow"],
    "00000007": ["what is the list"],
}
WORD_COUNT = ["a 9", "list 5", "is 4", "pointer 3", "sort 3", "the 2", "python 2", "what 1"]


def expected(sentences, vocab, seq_len):
    """FedJAX's tokenizer, restated: ``(x, y)`` with y's padding as -1 (no target)."""
    oov = 3 + len(vocab)
    xs, ys = [], []
    for s in sentences:
        seq = [1] + [3 + vocab.index(w) if w in vocab else oov for w in s.split(" ")] + [2]
        x, y = seq[:-1][:seq_len], seq[1:][:seq_len]
        xs.append(x + [0] * (seq_len - len(x)))
        ys.append(y + [-1] * (seq_len - len(y)))
    return np.array(xs, np.int32), np.array(ys, np.int32)


def write_tff(directory, train=TRAIN, test=TEST, word_count=True):
    """``stackoverflow_{train,test}.h5``: ``/examples/<user>/<feature>`` byte strings."""
    for split, users in (("train", train), ("test", test)):
        with h5py.File(directory / f"stackoverflow_{split}.h5", "w") as f:
            for cid, posts in users.items():
                group = f.create_group(f"examples/{cid}")
                text = h5py.string_dtype()
                group.create_dataset("tokens", data=[p.encode() for p in posts], dtype=text)
                group.create_dataset("title", data=[b"t"] * len(posts), dtype=text)
                group.create_dataset("tags", data=[b"python|list"] * len(posts), dtype=text)
                group.create_dataset("type", data=[b"question"] * len(posts), dtype=text)
                group.create_dataset("score", data=np.arange(len(posts), dtype=np.int64))
    if word_count:
        (directory / "stackoverflow.word_count").write_text("\n".join(WORD_COUNT) + "\n")


def write_fedjax(directory, train=TRAIN, test=TEST):
    """``stackoverflow_{train,test}.sqlite`` with FedJAX's features (bytes arrays)."""
    for split, users in (("train", train), ("test", test)):
        clients = []
        for cid, posts in users.items():
            n = len(posts)
            clients.append(
                (
                    cid,
                    {
                        "tokens": np.array([p.encode() for p in posts], dtype=object),
                        "type": np.array([b"answer"] * n, dtype=object),
                        "score": np.arange(n, dtype=np.int64),
                    },
                )
            )
        write_fedjax_sqlite(directory / f"stackoverflow_{split}.sqlite", clients)
    (directory / "stackoverflow.word_count").write_text("\n".join(WORD_COUNT) + "\n")


def test_tokens_by_hand():
    vocab = ["the", "a", "is"]
    x, y = benchmarks.stackoverflow_tokens(["the cat is", "a"], vocab, 4)
    # the -> 3, cat -> OOV 6, is -> 5; [BOS 1, 3, 6, 5, EOS 2].
    np.testing.assert_array_equal(x, [[1, 3, 6, 5], [1, 4, 0, 0]])
    np.testing.assert_array_equal(y, [[3, 6, 5, 2], [4, 2, -1, -1]])
    x, y = benchmarks.stackoverflow_tokens(["the cat is"], vocab, 3)  # truncated: no EOS
    np.testing.assert_array_equal(x, [[1, 3, 6]])
    np.testing.assert_array_equal(y, [[3, 6, 5]])
    # The dataset's OOV id stays 3 + vocab_size when the vocabulary is shorter.
    _, y = benchmarks.stackoverflow_tokens(["cat"], vocab, 2, oov=13)
    np.testing.assert_array_equal(y, [[13, 2]])


def test_counted_vocabulary_ranks_by_count_then_word():
    vocab = benchmarks.counted_vocabulary(["b a c", "a b", "a d"], 3)
    assert vocab == ["a", "b", "c"]  # a: 3, b: 2, then c and d tie at 1: alphabetical


@pytest.fixture(scope="module")
def tff_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("so_tff")
    write_tff(d)
    return d


@pytest.mark.parametrize("seq_len", [4, 12])
def test_tff_files_natural_clients_and_tokens(tff_dir, seq_len):
    ds = benchmarks.load("stackoverflow", str(tff_dir), vocab_size=5, seq_len=seq_len)
    vocab = [line.split()[0] for line in WORD_COUNT[:5]]
    assert ds.num_classes == 5 + 4
    assert ds.accuracy_ignore == (2, 8)  # EOS and the OOV bucket 3 + 5
    assert ds.target_shape == (seq_len,)
    assert ds.train.x.dtype == np.int32
    ids = sorted(TRAIN)  # TFF's clients in sorted order
    assert ds.num_clients == len(ids)
    for c, cid in enumerate(ids):
        x, y = client_rows(ds, c)
        want_x, want_y = expected(TRAIN[cid], vocab, seq_len)
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)
    # Test examples keep their user: TFF sorts the test file's users too.
    test_ids = sorted(TEST)
    want = [expected(TEST[cid], vocab, seq_len) for cid in test_ids]
    np.testing.assert_array_equal(ds.test_x, np.concatenate([w[0] for w in want]))
    np.testing.assert_array_equal(ds.test_y, np.concatenate([w[1] for w in want]))
    owners = np.repeat(np.arange(len(test_ids)), [len(TEST[c]) for c in test_ids])
    np.testing.assert_array_equal(ds.test_client, owners)


def test_fedjax_files_agree_with_tff(tmp_path):
    """The same posts in FedJAX's SQLite layout give the same tokens (rowid order)."""
    ordered = dict(sorted(TRAIN.items()))
    write_fedjax(tmp_path, train=ordered, test=dict(sorted(TEST.items())))
    a = benchmarks.load("stackoverflow", str(tmp_path), format="fedjax", vocab_size=6)
    write_tff(tmp_path)
    b = benchmarks.load("stackoverflow", str(tmp_path), format="tff", vocab_size=6)
    for name in ("x", "y", "count"):
        np.testing.assert_array_equal(getattr(a.train, name), getattr(b.train, name))
    np.testing.assert_array_equal(a.test_y, b.test_y)
    np.testing.assert_array_equal(a.test_client, b.test_client)


def test_max_clients_reads_the_first_users_and_their_test_posts(tff_dir):
    ds = benchmarks.load("stackoverflow", str(tff_dir), vocab_size=5, max_clients=1)
    first = sorted(TRAIN)[0]
    assert ds.num_clients == 1 and int(ds.train.count[0]) == len(TRAIN[first])
    assert len(ds.test_y) == len(TEST[first]) and set(ds.test_client.tolist()) == {0}


def test_vocabulary_counted_from_training_posts_without_a_word_count_file(tmp_path):
    write_tff(tmp_path, word_count=False)
    ds = benchmarks.load("stackoverflow", str(tmp_path), vocab_size=3, seq_len=8)
    posts = [p for cid in sorted(TRAIN) for p in TRAIN[cid]]
    words = [w for p in posts for w in p.split(" ")]
    # Counted by hand-rolled ranking: most frequent first, ties alphabetical.
    ranked = sorted(set(words), key=lambda w: (-words.count(w), w))[:3]
    x, y = client_rows(ds, 0)
    want_x, want_y = expected(TRAIN[sorted(TRAIN)[0]], ranked, 8)
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(y, want_y)


def test_start_up_line_counts_the_targets_bytes(tff_dir):
    ds = benchmarks.load("stackoverflow", str(tff_dir), vocab_size=5, seq_len=6)
    config = default_config.get_config()
    config.model.student = "lstm-4-8"
    line = experiment.describe_run(config, ds)
    # 6 int32 tokens in and 6 int32 targets out: 48 bytes an example.
    assert "of (6,) int32 with 6 targets each (48 B each with its labels)" in line


def test_label_counts_count_real_targets(tff_dir):
    ds = benchmarks.load("stackoverflow", str(tff_dir), vocab_size=5, seq_len=12)
    counts = ds.label_counts()
    for c, cid in enumerate(sorted(TRAIN)):
        _, y = expected(TRAIN[cid], [w.split()[0] for w in WORD_COUNT[:5]], 12)
        want = np.bincount(y[y >= 0], minlength=ds.num_classes)
        np.testing.assert_array_equal(counts[c], want)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(MissingFile, match="missing stackoverflow_train.h5.*https://"):
        benchmarks.load("stackoverflow", str(tmp_path))
    write_tff(tmp_path)
    (tmp_path / "stackoverflow.word_count").write_text("a 9\nlist five\n")
    with pytest.raises(CorruptFile, match="word_count: line 2 is not 'word count'"):
        benchmarks.load("stackoverflow", str(tmp_path), vocab_size=3)


def _run(tmp_path, *extra):
    return cli.main(
        [
            "run",
            "--config.data.name=stackoverflow",
            f"--config.data.dir={tmp_path}",
            "--config.stackoverflow.vocab_size=5",
            "--config.stackoverflow.seq_len=6",
            "--config.model.student=lstm-4-8",
            "--config.rounds=2",
            "--config.eval_every=1",
            "--config.clients_per_round=2",
            "--config.client.epochs=1",
            "--config.client.batch_size=2",
            f"--workdir={tmp_path / 'run'}",
            "--no-progress",
            *extra,
        ]
    )


def test_cli_runs_stackoverflow_and_reports_per_client_token_accuracy(tmp_path):
    write_tff(tmp_path)
    assert _run(tmp_path) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    last = records[-1]
    for key in ("test_accuracy", "test_accuracy_clients_mean", "test_accuracy_clients_p10"):
        assert 0.0 <= last[key] <= 1.0
    assert last["test_accuracy_clients_weighted"] == pytest.approx(last["test_accuracy"], 1e-6)


def test_cli_label_partition_of_stackoverflow_is_one_error_line(tmp_path, capsys):
    write_tff(tmp_path)
    assert _run(tmp_path, "--config.stackoverflow.partition=dirichlet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "per position" in err[0]


def test_a_large_population_is_stored_ragged_and_trains_as_padded(tff_dir, monkeypatch):
    """Above RAGGED_ABOVE_BYTES the users are stored back to back; a round is the same."""
    import optax

    from fedjax_kd import algorithms, models, simulate
    from fedjax_kd.data import RaggedClientData, federated

    padded = benchmarks.load("stackoverflow", str(tff_dir), vocab_size=5, seq_len=6)
    monkeypatch.setattr(federated, "RAGGED_ABOVE_BYTES", 0)
    ragged = benchmarks.load("stackoverflow", str(tff_dir), vocab_size=5, seq_len=6)
    assert isinstance(ragged.train, RaggedClientData) and ragged.train.y.shape[1:] == (6,)
    model = models.create("lstm-4-8", feature_shape=(6,), num_classes=9, per_position=True)
    algo = algorithms.fed_avg(
        model,
        client_optimizer=optax.sgd(0.5),
        server_optimizer=optax.sgd(1.0),
        epochs=1,
        batch_size=2,
    )
    runs = [
        simulate.run(algo, ds, rounds=2, clients_per_round=2, eval_every=1, seed=0, progress=False)
        for ds in (padded, ragged)
    ]
    for a, b in zip(*(jax_leaves(r.state) for r in runs), strict=True):
        np.testing.assert_array_equal(a, b)
    assert runs[0].history[-1]["test_accuracy"] == runs[1].history[-1]["test_accuracy"]


def jax_leaves(tree):
    import jax

    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


@pytest.mark.parametrize("fmt", ["tff", "fedjax"])
def test_a_file_without_tokens_is_named(tmp_path, fmt):
    if fmt == "tff":
        write_tff(tmp_path)
        with h5py.File(tmp_path / "stackoverflow_train.h5", "a") as f:
            del f[f"examples/{sorted(TRAIN)[0]}/tokens"]
        name = "stackoverflow_train.h5"
    else:
        write_fedjax(tmp_path)
        clients = [("u1", {"title": np.array([b"t"], dtype=object)})]
        (tmp_path / "stackoverflow_train.sqlite").unlink()
        write_fedjax_sqlite(tmp_path / "stackoverflow_train.sqlite", clients)
        name = "stackoverflow_train.sqlite"
    with pytest.raises(CorruptFile, match=f"{name}: client .* has no feature 'tokens'"):
        benchmarks.load("stackoverflow", str(tmp_path), format=fmt, vocab_size=3)


def test_empty_words_and_posts_are_out_of_vocabulary():
    """Splitting on single spaces, as tf.strings.split(sep=' '): "" is a word, never a known one."""
    x, y = benchmarks.stackoverflow_tokens(["a  b", ""], ["a", "b"], 5)
    # "a", "", "b" -> 3, OOV 5, 4; the empty post is one empty word.
    np.testing.assert_array_equal(x, [[1, 3, 5, 4, 0], [1, 5, 0, 0, 0]])
    np.testing.assert_array_equal(y, [[3, 5, 4, 2, -1], [5, 2, -1, -1, -1]])
    assert benchmarks.counted_vocabulary(["a  b", "", "b"], 5) == ["b", "a"]


def test_a_shorter_vocabulary_keeps_the_oov_id_of_vocab_size(tmp_path):
    write_tff(tmp_path)
    (tmp_path / "stackoverflow.word_count").write_text("a 9\nlist 5\n")
    ds = benchmarks.load("stackoverflow", str(tmp_path), vocab_size=4, seq_len=12)
    assert ds.num_classes == 8 and ds.accuracy_ignore == (2, 7)
    _, y = client_rows(ds, 0)
    want = expected(TRAIN[sorted(TRAIN)[0]], ["a", "list"], 12)[1]
    np.testing.assert_array_equal(y, np.where(want == 5, 7, want))  # OOV 3 + 2 -> 3 + 4


def test_fedjax_max_clients_reads_only_those_users(tmp_path):
    write_fedjax(tmp_path)
    ds = benchmarks.load("stackoverflow", str(tmp_path), format="fedjax", max_clients=2)
    first = list(TRAIN)[:2]  # FedJAX keeps the file's row order
    assert ds.num_clients == 2
    assert len(ds.test_y) == sum(len(TEST.get(c, [])) for c in first)


def test_users_without_test_posts_are_one_clear_error(tmp_path):
    write_tff(tmp_path, test={"99999999": ["other user"]})
    with pytest.raises(CorruptFile, match="none of the 1 users read has test posts"):
        benchmarks.load("stackoverflow", str(tmp_path), max_clients=1)
