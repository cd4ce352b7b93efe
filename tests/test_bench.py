"""fedjax-kd bench: rows for every (algorithm, K, method), an honest loop, equal work, bad input."""

import json
import math
import os
import statistics
import time

import chex
import jax
import jax.numpy as jnp
import pytest
from helpers import one_error_line

from fedjax_kd import bench

TINY = bench.BenchConfig(clients=(2, 4), reps=2, examples_per_client=32, batch_size=16)
KEYS = ("algorithm", "clients", "method", "examples_per_s", "s_per_round", "compile_s")


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
    """The whole command on a tiny workload, through the standalone entry point.

    ``--chunk-size 3``: K=2 is one chunk, K=4 two chunks (the second padded with a
    dummy client), so the loop == vmap check below also covers the chunked round.
    """
    path = tmp_path_factory.mktemp("bench") / "rows.json"
    argv = ["--clients", "2,4", "--reps", "2", "--examples-per-client", "32"]
    argv += ["--batch-size", "16", "--chunk-size", "3", "--burst", "2", "--json", str(path)]
    assert bench.main(argv) == 0
    return json.loads(path.read_text())


def test_rows_cover_every_algorithm_k_and_method_with_positive_numbers(tiny_rows):
    got = {(r["algorithm"], r["clients"], r["method"]) for r in tiny_rows}
    assert got == {(a, k, m) for a in bench.ALGORITHMS for k in (2, 4) for m in bench.METHODS}
    assert len(tiny_rows) == len(got)
    for r in tiny_rows:
        for key in (*KEYS, "peak_rss_mb", "reps", "n_per_client"):
            assert key in r, key
        for key in ("examples_per_s", "s_per_round", "compile_s", "peak_rss_mb"):
            assert r[key] > 0 and math.isfinite(r[key]), (key, r)
        assert r["reps"] == 2 and len(r["s_per_round_all"]) == 2 and r["burst"] == 2
        assert r["s_per_round"] == pytest.approx(statistics.median(r["s_per_round_all"]), abs=1e-6)
        assert r["examples_per_s"] == pytest.approx(r["examples_per_round"] / r["s_per_round"])
        assert "skipped" not in r


def test_every_method_does_the_same_work(tiny_rows):
    """Same examples per round and, with n a multiple of the batch, the same SGD steps."""
    for r in tiny_rows:
        assert r["examples_per_round"] == r["clients"] * 32
        assert r["sgd_steps"] == r["clients"] * 32 // 16  # measured for loop and central
    for r in (r for r in tiny_rows if r["method"] == "loop"):
        assert r["max_abs_diff_vs_vmap"] < 1e-5  # checked on every bench run
    assert {r["chunk_size"] for r in tiny_rows if r["method"] == "vmap"} == {3}


def test_table_has_ratios_and_kd_overhead(tiny_rows):
    table = bench.format_table(tiny_rows)
    assert "vmap/central" in table and "vmap/loop" in table
    assert "KD overhead" in table and "pred@student" in table and "pred@teacher" in table


def test_kd_overhead_columns_hand_computed():
    """extra = kd - fedavg; pred@student = fedavg_s * F_t / F_train; pred@teacher = fwd time."""

    def row(algorithm, s, flops, **extra):
        return {
            "algorithm": algorithm,
            "dtype": "f32",
            "clients": 10,
            "method": "vmap",
            "donate": False,
            "examples_per_s": 640 / s,
            "s_per_round": s,
            "compile_s": 1.0,
            "peak_rss_mb": 1.0,
            "flops_per_round": flops,
            "epochs": 1,
            "student_forward_flops": 100,
            "teacher_forward_flops": 400,
            **extra,
        }

    # Per example: student training 3 * 100 = 300 FLOPs, teacher forward 400.
    rows = [
        row("fedavg", 0.002, 640 * 300),
        row("teacher_student", 0.005, 640 * 700, teacher_forward_s=0.0025),
    ]
    lines = bench.format_table(rows).splitlines()
    kd = lines[next(i for i, line in enumerate(lines) if "pred@teacher" in line) + 1 :]
    kd_row = next(line for line in kd if line.split()[:3] == ["f32", "10", "vmap"])
    # extra 0.003; pred@student 0.002 * 400/300 = 0.00267 (ratio 1.125);
    # pred@teacher 0.0025 (ratio 1.2).
    assert kd_row.split()[3:] == ["0.0020", "0.0050", "0.0030", "0.0027", "1.12", "0.0025", "1.20"]


def test_auto_burst_hand_computed():
    """ceil(0.02 s / fastest warm-up round), clipped to [1, 10]; equal for all methods."""

    def entries(*first_round_s):
        out = []
        for t in first_round_s:
            e = bench._Entry("fedavg", "f32", bench.Method("vmap", None, 0.0, None), None)
            e.extra["first_round_s"] = t
            out.append(e)
        return out

    assert bench._auto_burst(entries(0.0001, 0.5)) == 10  # capped
    assert bench._auto_burst(entries(0.009, 0.003)) == 7  # ceil(0.02 / 0.003)
    assert bench._auto_burst(entries(0.05, 0.3)) == 1
    assert bench._auto_burst(entries(0.02)) == 1
    diagnostic = bench._Entry(
        "teacher_student", "f32", bench.Method("teacher_forward", None, 0, 0), 0
    )
    diagnostic.extra["first_round_s"] = 0.0001  # not a round: ignored
    assert bench._auto_burst([*entries(0.005), diagnostic]) == 4


def test_loop_skip_counts_every_round_of_the_bursts():
    """A loop within budget for reps + 1 rounds is skipped once bursts multiply them."""
    config = bench.BenchConfig(clients=(100,), reps=4, max_loop_seconds=1.0)
    loop = bench.Method("loop", None, 0.1, state=None)
    entry = bench._Entry("fedavg", "f32", loop, None)
    entry.extra["loop_estimate_s"] = 0.1  # 5 rounds: 0.5 s; 4 * 3 + 1 = 13 rounds: 1.3 s
    bench._skip_slow_loops([entry], config, 1, 100, log=lambda msg: None)
    assert entry.skipped is None
    bench._skip_slow_loops([entry], config, 3, 100, log=lambda msg: None)
    assert entry.skipped and "13 rounds" in entry.skipped


def test_loop_round_equals_the_vmapped_round():
    """Same state and key: the loop baseline computes the same round as the vmapped one.

    teacher_student exercises every part of the loop (teacher logits in the per-client
    call, kd_scale, the round counter); for fedavg the same comparison runs inside
    every bench run (``max_abs_diff_vs_vmap``, asserted on the tiny run above).
    """
    algorithm = "teacher_student"
    cohort = jax.tree.map(jnp.asarray, bench.make_cohort(3, 32, seed=1))
    key = jax.random.key(7)
    built = bench.build_methods(algorithm, TINY, cohort, key, include=("vmap", "loop"))
    methods = {m.name: m for m in built}
    assert set(methods) == {"vmap", "loop"}
    start = methods["vmap"].state.params
    vmap_state, vmap_metrics = methods["vmap"].run(methods["vmap"].state, key)
    loop_state, loop_metrics = methods["loop"].run(methods["loop"].state, key)
    chex.assert_trees_all_close(loop_state.params, vmap_state.params, atol=1e-6, rtol=1e-5)
    moved = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), vmap_state.params, start)
    assert max(jax.tree.leaves(moved)) > 1e-4  # a real training step, not a no-op
    assert float(loop_metrics["train_loss"]) == pytest.approx(float(vmap_metrics["train_loss"]))
    assert int(loop_metrics["local_steps"]) == 3 * 2 and bool(loop_metrics["finite"])
    assert int(loop_state.round) == int(vmap_state.round) == 1


def test_flops_are_counted_per_dense_layer():
    assert bench.forward_flops("mlp-64", 60, 10) == 2 * (60 * 64 + 64 * 10)
    assert bench.forward_flops("mlp-256-256", 60, 10) == 2 * (60 * 256 + 256 * 256 + 256 * 10)
    assert bench.forward_flops("linear", 60, 10) == 2 * 60 * 10


def test_cohort_is_unpadded_and_deterministic():
    a, b = bench.make_cohort(5, 8, seed=3), bench.make_cohort(5, 8, seed=3)
    assert a.x.shape == (5, 8, 60) and a.y.shape == (5, 8) and (a.count == 8).all()
    assert (a.x == b.x).all() and (a.y == b.y).all()
    assert 0 <= a.y.min() and a.y.max() < 10


def test_loop_over_budget_is_skipped_not_faked(tiny_rows):
    """--max-loop-seconds: a probe estimates the loop; over budget it is never run or faked."""
    config = bench.BenchConfig(clients=(1000,), reps=4, max_loop_seconds=1.0)

    def never(*args):
        raise AssertionError("a skipped loop must not run")

    probed = []

    def probe(state, key, num_clients):  # 10 ms per 32 clients: ~0.3 s per round of 1000
        probed.append(num_clients)
        time.sleep(0.01)

    loop = bench.Method("loop", never, 0.5, state=None, probe=probe)
    entry = bench._Entry("fedavg", "f32", loop, None)
    bench._warm_up([entry], None, config, 1000, log=lambda msg: None)
    assert probed == [bench.PROBE_CLIENTS] * 2 and entry.skipped
    assert "max-loop-seconds" in entry.skipped and entry.extra["loop_estimate_s"] >= 0
    row = bench._row(entry, config, 1000, 1, 1, jax.devices()[0])
    assert row["s_per_round"] is None and row["examples_per_s"] is None and row["reps"] == 0
    assert row["skipped"] == entry.skipped
    assert "skipped" in bench.format_table([*tiny_rows, row])


BAD_ARGS = [
    (["--clients", "10,x"], "argument --clients"),
    (["--clients", "0"], "argument --clients"),
    (["--algorithms", "fedfoo"], "unknown 'fedfoo'"),
    (["--reps", "0"], "argument --reps"),
    (["--examples-per-client", "40"], "multiple of --batch-size"),
    (["--max-loop-seconds", "0"], "argument --max-loop-seconds"),
    (["--lr", "nan"], "argument --lr"),
    (["--student", "resnot-8"], "--student: unknown model"),
    (["--teacher", "cnn-8"], "--teacher: cnn-8 cannot take --input features:60: cnn models need"),
    (["--student", "resnet-8"], "--student: resnet-8 cannot take --input features:60: resnet"),
    # --input: one line per mistake, before anything runs.
    (["--input", "pixels:32x32x3"], "--input: unknown input kind 'pixels'"),
    (["--input", "image"], "--input image: give the shape after a colon"),
    (["--input", "image:32x32"], "--input image:32x32: expected image:HxWxC"),
    (["--input", "image:32x0x3"], "--input image:32x0x3: expected image:HxWxC"),
    (["--input", "features:sixty"], "--input features:sixty: expected features:N"),
    (["--input", "tokens:80"], "--input tokens:80: expected tokens:T:V"),
    (["--input", "tokens:80:1"], "vocabulary V >= 2"),
    (
        ["--input", "image:32x32x3", "--student", "lstm-8-64"],
        "--student: lstm-8-64 takes int32 token ids, and --input image:32x32x3 holds uint8",
    ),
    (
        ["--input", "tokens:80:81", "--student", "lstm-8-64"],  # the default mlp teacher
        "--teacher: mlp-256-256 takes features or pixels, and --input tokens:80:81 holds int32",
    ),
    (
        ["--input", "tokens:80:81", "--student", "resnet-8", "--teacher", "lstm-8-64"],
        "--student: resnet-8 takes features or pixels",
    ),
    (
        ["--input", "image:30x30x1", "--student", "cnn5-8-8-16", "--teacher", "resnet-8"],
        "--student: cnn5-8-8-16 cannot take --input image:30x30x1: cnn5 needs image sides",
    ),
    (["--dtype", "fp8"], "argument --dtype"),
    (["--chunk-size", "0"], "argument --chunk-size"),
    (["--compare-chunk", "0"], "argument --compare-chunk"),
    (["--burst", "0"], "argument --burst"),
    # --json is checked before the benchmark runs (Linux paths no one may write, root included).
    (["--json", "/proc/version/dir/rows.json"], "cannot create its directory /proc/version/dir"),
    (["--json", "/proc/version"], "--json /proc/version: cannot write there"),
    (["--json", "/"], "--json /: is a directory"),
    (["--json", ""], "--json: the path is empty"),
    (["--bogus"], "unrecognized arguments"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_ARGS)
def test_bad_arguments_fail_with_one_error_line(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: pytest.fail("benchmark ran"))
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_add_arguments_and_run_for_the_cli(monkeypatch, tmp_path, capsys):
    """The pieces the `fedjax-kd` command wires in: add_arguments(parser) + run(args)."""
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--clients", "3", "--algorithms", "fedavg"])
    assert args.clients == (3,) and args.algorithms == ("fedavg",) and args.reps == 5
    seen = {}

    def fake(config, **kwargs):
        seen["config"] = config
        return []

    from fedjax_kd.bench import cli as bench_cli  # run() calls the timing module's function

    monkeypatch.setattr(bench_cli, "run_benchmark", fake)
    assert bench.run(args) == 0
    assert seen["config"].clients == (3,) and seen["config"].examples_per_client == 64


def test_compare_chunk_columns_hand_computed():
    """An extra chunked vmap row gets its own ratio columns; the main ratios ignore it."""

    def row(method, eps, chunk=None, compare=False):
        return {
            "algorithm": "fedavg",
            "dtype": "f32",
            "clients": 100,
            "method": method,
            "donate": False,
            "chunk_size": chunk,
            "compare_chunk": compare,
            "examples_per_s": eps,
            "s_per_round": 6400 / eps,
            "compile_s": 1.0,
            "peak_rss_mb": 1.0,
        }

    rows = [
        row("vmap", 800.0),
        row("vmap", 1200.0, chunk=10, compare=True),
        row("loop", 400.0),
        row("central", 1000.0),
    ]
    table = bench.format_table(rows)
    header = next(line for line in table.splitlines() if "vmap/central" in line)
    assert header.split()[-3:] == ["c10/central", "c10/loop", "c10/vmap"]
    lines = table.splitlines()
    ratios = lines[lines.index(header) + 1]
    # vmap/central 0.8, vmap/loop 2.0; c10/central 1.2, c10/loop 3.0, c10/vmap 1.5.
    assert ratios.split()[-5:] == ["0.80", "2.00", "1.20", "3.00", "1.50"]
    assert "vmap/c10" in table


def test_skipped_loop_row_records_the_burst_of_its_k():
    config = bench.BenchConfig(
        clients=(2,),
        algorithms=("fedavg",),
        reps=1,
        examples_per_client=16,
        batch_size=16,
        max_loop_seconds=1e-6,
        burst=2,
    )
    rows = {r["method"]: r for r in bench.run_benchmark(config, log=lambda msg: None)}
    assert rows["loop"]["skipped"] and rows["loop"]["s_per_round"] is None
    assert "3 rounds" in rows["loop"]["skipped"]  # reps * burst + 1
    assert {r["burst"] for r in rows.values()} == {2}
    assert rows["vmap"]["reps"] == 1 and rows["vmap"]["s_per_round"] > 0


def test_chunked_teacher_forward_equals_the_whole_cohort():
    """The diagnostic in a row's chunks (7 clients in chunks of 3, 2 padding rows) == unchunked."""
    config = bench.BenchConfig(clients=(7,), compare_chunk=3, examples_per_client=32, batch_size=16)
    cohort = jax.tree.map(jnp.asarray, bench.make_cohort(7, 32, seed=2))
    built = bench.build_methods(
        "teacher_student", config, cohort, jax.random.key(0), include=("vmap", "teacher_forward")
    )
    forwards = {m.chunk: m for m in built if m.name == "teacher_forward"}
    assert set(forwards) == {None, 3}
    whole, chunked = (forwards[c].run(forwards[c].state, None)[1] for c in (None, 3))
    assert whole.shape == chunked.shape == (7, 32, 10)
    chex.assert_trees_all_close(chunked, whole, atol=1e-6)


def test_kd_rows_take_the_teacher_forward_of_their_own_chunks(tiny_rows):
    """--chunk-size 3: the vmap rows' prediction is the chunked forward, loop/central's not."""
    for r in tiny_rows:
        if r["algorithm"] == "teacher_student":
            assert r["teacher_forward_s"] > 0, r
            assert r["teacher_forward_chunk"] == (3 if r["method"] == "vmap" else None)
    table = bench.format_table(tiny_rows)
    assert "in the row's chunks" in table


def test_json_parent_is_created_and_the_probe_leaves_no_file(monkeypatch, tmp_path, capsys):
    from fedjax_kd.bench import cli as bench_cli

    target = tmp_path / "new" / "sub" / "rows.json"
    ran = []

    def fake(config, **kwargs):
        ran.append(target.exists())  # the probe removed its empty file before the run
        return []

    monkeypatch.setattr(bench_cli, "run_benchmark", fake)
    monkeypatch.setattr(bench_cli, "format_table", lambda rows: "table")
    assert bench.main(["--clients", "3", "--json", str(target)]) == 0
    assert ran == [False]
    assert json.loads(target.read_text()) == []


def test_a_failed_json_write_keeps_the_earlier_file(monkeypatch, tmp_path, capsys):
    """--json is replaced atomically: a full disk at the end leaves the old rows intact."""
    import errno

    from fedjax_kd import workdir
    from fedjax_kd.bench import cli as bench_cli

    target = tmp_path / "rows.json"
    target.write_text('[{"old": 1}]\n')
    monkeypatch.setattr(bench_cli, "run_benchmark", lambda config, **kwargs: [{"new": 2}])
    monkeypatch.setattr(bench_cli, "format_table", lambda rows: "table")

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(workdir.os, "replace", full)
    assert bench.main(["--clients", "3", "--json", str(target)]) == 1
    assert "No space left on device" in one_error_line(capsys.readouterr().err)
    assert target.read_text() == '[{"old": 1}]\n'
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_json_without_permission_is_refused_before_the_run(monkeypatch, tmp_path, capsys):
    from fedjax_kd.bench import cli as bench_cli

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    monkeypatch.setattr(bench_cli, "run_benchmark", lambda *a, **k: pytest.fail("ran"))
    try:
        assert bench.main(["--json", str(locked / "rows.json")]) == 2
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --json {locked / 'rows.json'}: cannot write there"), err


def test_cli_refuses_an_empty_json_path_in_one_line(capsys):
    from fedjax_kd import cli

    assert cli.main(["bench", "--json", ""]) == 2
    assert capsys.readouterr().err.strip() == "error: --json: the path is empty; give a path"


# --------------------------------------------------------------------------- --input


def _synthetic_iid_before_inputs(num_clients, examples_per_client, seed=0):
    """``make_cohort`` as it was before ``--input`` (a frozen copy: the features oracle)."""
    import numpy as np

    from fedjax_kd.data import ClientData

    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 1.0, (60, 10))
    b = rng.normal(0.0, 1.0, 10)
    total = num_clients * examples_per_client
    x = rng.standard_normal((total, 60), dtype=np.float32)
    x *= np.sqrt(np.arange(1, 61, dtype=np.float64) ** -1.2).astype(np.float32)
    y = np.empty(total, np.int32)
    for start in range(0, total, 1 << 16):
        rows = slice(start, start + (1 << 16))
        y[rows] = np.argmax(x[rows].astype(np.float64) @ w + b, axis=1)
    return ClientData(
        x=x.reshape(num_clients, examples_per_client, 60),
        y=y.reshape(num_clients, examples_per_client),
        count=np.full((num_clients,), examples_per_client, np.int32),
    )


@pytest.mark.parametrize(("k", "n", "seed"), [(5, 8, 3), (2, 40_000, 0)])  # 2nd: > 2^16 rows
def test_features_60_cohort_is_bit_for_bit_the_original(k, n, seed):
    before = _synthetic_iid_before_inputs(k, n, seed)
    for got in (bench.make_cohort(k, n, seed), bench.make_cohort(k, n, seed, "features:60")):
        for a, b in zip(got, before, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and (a == b).all()
    assert bench.BenchConfig().input == "features:60" == bench.DEFAULT_INPUT


def test_input_kinds_parse_to_shapes_dtypes_and_classes():
    cases = {
        "features:60": ("features", (60,), 10, "float32"),
        "image:32x32x3": ("image", (32, 32, 3), 10, "uint8"),
        "tokens:80:81": ("tokens", (80,), 81, "int32"),
    }
    for text, (kind, shape, classes, dtype) in cases.items():
        got = bench.parse_input(text)
        assert (got.text, got.kind, got.shape, got.num_classes, got.dtype) == (
            text, kind, shape, classes, dtype,
        )  # fmt: skip
    assert bench.parse_input(" image:08x8x3 ").text == "image:8x8x3"


def test_image_and_token_cohorts_are_deterministic_and_follow_their_rules():
    import numpy as np

    images = bench.make_cohort(3, 40, 5, "image:8x8x3")
    assert images.x.shape == (3, 40, 8, 8, 3) and images.x.dtype == np.uint8
    assert images.y.shape == (3, 40) and images.y.dtype == np.int32 and (images.count == 40).all()
    assert len(np.unique(images.y)) >= 5 and images.x.min() == 0 and images.x.max() == 255
    tokens = bench.make_cohort(4, 50, 5, "tokens:6:7")
    assert tokens.x.shape == (4, 50, 6) and tokens.x.dtype == tokens.y.dtype == np.int32
    assert 0 <= tokens.x.min() and tokens.x.max() < 7 and 0 <= tokens.y.min() and tokens.y.max() < 7
    # One fixed Markov chain: every token is followed by at most 4 tokens, in the
    # windows and in the labels alike, so the label is learnable from the last token.
    seq = np.concatenate([tokens.x, tokens.y[..., None]], axis=-1).reshape(-1, 7)
    successors = {}
    for a, b in zip(seq[:, :-1].ravel(), seq[:, 1:].ravel(), strict=True):
        successors.setdefault(int(a), set()).add(int(b))
    assert max(map(len, successors.values())) <= 4
    for inp, cohort in (("image:8x8x3", images), ("tokens:6:7", tokens)):
        again = bench.make_cohort(cohort.y.shape[0], cohort.y.shape[1], 5, inp)
        other = bench.make_cohort(cohort.y.shape[0], cohort.y.shape[1], 6, inp)
        assert all((a == b).all() for a, b in zip(again, cohort, strict=True))
        assert not (other.x == cohort.x).all()


NEW_INPUTS = [
    # input, student, teacher: the papers' model families on uint8 pixels and int32 tokens.
    ("image:8x8x3", "cnn-4", "resnet-8"),
    ("tokens:6:7", "lstm-4-8", "lstm-4-16"),
]


@pytest.mark.parametrize(("inp", "student", "teacher"), NEW_INPUTS)
def test_vmap_loop_and_central_agree_on_new_inputs(inp, student, teacher):
    """One client holding one minibatch: the three methods are one SGD step, the same.

    (With K clients, vmap == loop is checked on every run, ``max_abs_diff_vs_vmap``,
    and asserted on images below; central then runs the clients' steps one after
    the other, the same work but not the same numbers.)
    """
    config = bench.BenchConfig(
        clients=(1,),
        examples_per_client=4,
        batch_size=4,
        student=student,
        teacher=teacher,
        input=inp,
    )
    config.validate()
    cohort = jax.tree.map(jnp.asarray, bench.make_cohort(1, 4, 1, inp))
    key = jax.random.key(7)
    built = bench.build_methods("teacher_student", config, cohort, key, include=bench.METHODS)
    methods = {m.name: m for m in built}
    assert set(methods) == set(bench.METHODS)
    out = {name: m.run(m.state, key) for name, m in methods.items()}
    start = methods["vmap"].state.params
    for name in ("loop", "central"):
        chex.assert_trees_all_close(out[name][0].params, out["vmap"][0].params, atol=1e-6)
        assert float(out[name][1]["train_loss"]) == pytest.approx(
            float(out["vmap"][1]["train_loss"]), rel=1e-5
        )
        assert int(out[name][1]["local_steps"]) == 1
    moved = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), out["vmap"][0].params, start)
    assert max(jax.tree.leaves(moved)) > 1e-4  # a real training step, not a no-op


def test_image_benchmark_rows_name_their_input_and_models():
    """The whole benchmark on uint8 pixels: loop == vmap at K = 2, the records say what ran.

    (A linear student keeps it quick; the cnn teacher's FLOPs come from XLA.)
    """
    config = bench.BenchConfig(
        clients=(2,),
        algorithms=("fedavg",),
        reps=1,
        burst=1,
        examples_per_client=4,
        batch_size=2,
        student="linear",
        teacher="cnn-2",
        input="image:8x8x3",
    )
    rows = {r["method"]: r for r in bench.run_benchmark(config, log=lambda msg: None)}
    assert set(rows) == set(bench.METHODS)
    assert rows["loop"]["max_abs_diff_vs_vmap"] < 1e-5
    f_teacher = bench.forward_flops("cnn-2", (8, 8, 3), 10, dtype="uint8")
    for r in rows.values():
        assert r["input"] == "image:8x8x3" and r["input_kind"] == "image"
        assert r["input_shape"] == [8, 8, 3] and r["input_dtype"] == "uint8"
        assert r["num_classes"] == 10 and r["student"] == "linear" and r["teacher_model"] == "cnn-2"
        assert r["student_flops_source"] == "matmul formula"
        assert r["teacher_flops_source"] == "xla cost analysis"
        assert (
            r["student_forward_flops"] == 2 * 192 * 10 and r["teacher_forward_flops"] == f_teacher
        )
        assert r["flops_per_round"] == 2 * 4 * 3 * 2 * 192 * 10 and r["gflops_per_s"] > 0
        assert r["sgd_steps"] == 2 * 2 and r["examples_per_round"] == 2 * 4
    table = bench.format_table(list(rows.values()))
    assert table.splitlines()[0] == "input image:8x8x3: student linear, teacher cnn-2"
    assert table.splitlines()[1].split()[-1] == "GFLOP/s"


def test_xla_flops_match_hand_counts():
    """Dense models keep the exact formula; XLA's count (loops included) matches hand counts."""
    assert bench.flops_source("mlp-64") == "matmul formula"
    assert bench.forward_flops("mlp-64", (60,), 10) == bench.forward_flops("mlp-64", 60, 10)
    # XLA on the same MLP: the formula's matmuls plus the bias adds and ReLUs.
    xla_mlp = bench.xla_forward_flops("mlp-64", (60,), 10, "float32")
    assert 8960 <= xla_mlp <= 8960 + 64 + 10 + 64 + 100
    # The LSTM scans its 80 steps: XLA counts a loop body once; the count adds the rest.
    e, h, t, v = 8, 64, 80, 81
    hand = 2 * (e * 4 * h + h * 4 * h) * t + 2 * h * v  # input, recurrent and head matmuls
    lstm = bench.model_flops("lstm-8-64", "tokens:80:81")
    assert bench.flops_source("lstm-8-64") == "xla cost analysis"
    assert hand <= lstm <= 1.1 * hand, (lstm, hand)
    # ResNet-8 on 32x32x3: the 3x3 convolutions (XLA skips the zero padding's taps, ~4%).
    convs = 32 * 32 * 16 * 2 * (3 * 9 + 2 * 16 * 9)  # stem, stage 1's two convolutions
    convs += 16 * 16 * 32 * 2 * (16 * 9 + 32 * 9 + 16)  # stage 2 and its 1x1 shortcut
    convs += 8 * 8 * 64 * 2 * (32 * 9 + 64 * 9 + 32) + 2 * 64 * 10  # stage 3, head
    resnet = bench.model_flops("resnet-8", "image:32x32x3")
    assert 0.93 * convs <= resnet <= 1.02 * convs, (resnet, convs)


def test_bf16_prepares_pixels_and_keeps_token_ids():
    """--dtype bf16 casts float inputs only, after uint8 pixels are scaled to [0, 1]."""
    from fedjax_kd.bench.methods import _cast_apply

    seen = []

    def apply(params, x):  # what the model is handed
        seen.append(x)
        return params["w"] * jnp.sum(x.astype(jnp.float32))

    cast = _cast_apply(apply, jnp.bfloat16)
    pixels = jnp.asarray([[0, 51, 255]], jnp.uint8)
    assert cast({"w": jnp.ones(())}, pixels).dtype == jnp.float32
    assert seen[-1].dtype == jnp.bfloat16
    assert seen[-1][0].tolist() == pytest.approx([0.0, 0.2, 1.0], abs=1e-3)  # not [0, 51, 255]
    tokens = jnp.asarray([[0, 257, 299]], jnp.int32)  # bfloat16 would round 257 and 299
    cast({"w": jnp.ones(())}, tokens)
    assert seen[-1].dtype == jnp.int32 and seen[-1].tolist() == [[0, 257, 299]]
    features = jnp.asarray([[0.5, -1.0]], jnp.float32)
    cast({"w": jnp.ones(())}, features)
    assert seen[-1].dtype == jnp.bfloat16 and seen[-1].tolist() == [[0.5, -1.0]]


def test_cli_passes_the_input_on(monkeypatch):
    from fedjax_kd.bench import cli as bench_cli

    seen = []
    monkeypatch.setattr(bench_cli, "run_benchmark", lambda config, **k: seen.append(config) or [])
    monkeypatch.setattr(bench_cli, "format_table", lambda rows: "table")
    argv = ["--input", "tokens:80:81", "--student", "lstm-8-64", "--teacher", "lstm-8-256-256"]
    assert bench.main(argv) == 0
    assert seen[0].input == "tokens:80:81" and seen[0].bench_input.shape == (80,)


def test_the_fedjax_kd_command_refuses_a_bad_input_in_one_line(capsys):
    from fedjax_kd import cli

    assert cli.main(["bench", "--input", "tokens:80"]) == 2
    assert one_error_line(capsys.readouterr().err).startswith("error: --input tokens:80: expected")
