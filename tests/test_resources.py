"""Resource limits: memory estimated from shapes and checked first; sizing options clipped."""

import math
import resource
import time

import jax
import numpy as np
import pytest
from helpers import one_error_line

from fedjax_kd import cli, experiment, resources, simulate


def test_huge_model_is_refused_fast_without_allocating(tmp_path, capsys, no_run):
    work = tmp_path / "work"
    experiment.resolve()  # warm the imports: the time below is the check's own
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    start = time.perf_counter()
    argv = ["run", "--config.model.student=mlp-100000-100000", "--workdir", str(work)]
    assert cli.main(argv) == 2
    elapsed = time.perf_counter() - start
    line = one_error_line(capsys.readouterr().err)
    assert elapsed < 5, elapsed
    # 64*1e5 + 1e5 + 1e5*1e5 + 1e5 + 1e5*10 + 10 float32 params: 40 GB of server state alone.
    params = 64 * 100_000 + 100_000 + 100_000**2 + 100_000 + 100_000 * 10 + 10
    assert f"{params:,} params" in line, line
    assert line.startswith("error: the run needs at least ") and "available" in line
    assert "algorithm state 40.0 GB" in line, line
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown_kb < 2_000_000, grown_kb  # nothing near the model's 40 GB was allocated
    assert not work.exists()  # refused before the workdir is touched


def test_estimate_matches_the_allocated_state_and_hand_counts():
    config = experiment.resolve(
        overrides=[
            ("model.student", "linear"),
            ("data.num_clients", "20"),
            ("clients_per_round", "6"),
            ("client_chunk_size", "4"),
            ("client.max_examples", "30"),
            ("server.optimizer", "adam"),
        ]
    )
    dataset = experiment.build_dataset(config)
    algorithm = experiment.build_algorithm(config, dataset)
    est = experiment._check_memory(config, dataset, algorithm)
    init_key = simulate.seed_keys(config.seed)[0]
    state = jax.jit(algorithm.init)(init_key)
    # Two formulations agree: bytes from shapes == bytes of the allocated state.
    assert est.state == sum(np.asarray(a).nbytes for a in jax.tree.leaves(state))
    params = 64 * 10 + 10  # linear on digits: 64 features, 10 classes
    assert est.params == params
    assert est.state >= 3 * 4 * params  # params + Adam's two moments (+ counters)
    cap = min(30, dataset.train.max_examples)
    assert est.cohort == 4 * cap * (64 * 4 + 4 + 1)  # chunk x examples x (x, y, mask)
    assert est.clients == 4 * 2 * 4 * params  # chunk x (params + gradient) x float32
    train = dataset.train
    assert est.data == sum(a.nbytes for a in (train.x, train.y, dataset.test_x, dataset.test_y))
    assert est.schedule == 4 * config.client.epochs * cap * 8  # chunk x epochs x examples
    assert est.total == est.state + est.data + est.cohort + est.clients + est.schedule


def test_huge_epochs_are_refused_by_their_schedule(capsys, no_run):
    """100M local epochs: every epoch's order of every client's examples cannot fit."""
    argv = ["run", "--config.client.epochs=100000000", "--config.rounds=1", "--no-progress"]
    assert cli.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "schedule of 100000000 epochs" in line and "more than the" in line, line


def test_a_step_count_past_int32_is_one_line(capsys):
    """FedMD's digest: 10^9 epochs x 128/32 batches overflows int32 while tracing."""
    argv = ["run", "--config.algorithm.name=fedmd", "--config.data.proxy_fraction=0.1"]
    argv += ["--config.fedmd.public_epochs=1000000000", "--config.rounds=1", "--no-progress"]
    assert cli.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "too large to compile" in line and "int32" in line, line


def test_per_client_stores_count_in_the_state():
    """FedKD keeps a mentor per client: its state grows with the population."""
    small, large = (
        experiment.resolve(overrides=[("algorithm.name", "fedkd"), ("data.num_clients", str(n))])
        for n in (20, 40)
    )
    sizes = []
    for config in (small, large):
        dataset = experiment.build_dataset(config)
        sizes.append(
            experiment._check_memory(
                config, dataset, experiment.build_algorithm(config, dataset)
            ).state
        )
    mentor = 4 * (64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10)  # mlp-256-256 float32
    assert sizes[1] - sizes[0] >= 20 * mentor


def test_refusal_gives_estimated_and_available(monkeypatch, capsys, no_run):
    monkeypatch.setattr(resources, "available_memory", lambda: (1000, "RAM available"))
    assert cli.main(["run", "--config.model.student=linear"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "more than the 1.0 kB RAM available" in line and "650 params" in line, line


def test_available_memory_reads_meminfo_and_device_stats():
    free, where = resources.available_memory()
    with open("/proc/meminfo") as f:
        meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    assert where == "RAM available"
    assert abs(free - meminfo["MemAvailable"]) < 0.2 * meminfo["MemTotal"]

    class FakeGpu:
        platform = "gpu"

        def memory_stats(self):
            return {"bytes_limit": 80_000, "bytes_in_use": 30_000}

        def __str__(self):
            return "cuda:0"

    assert resources.available_memory(FakeGpu()) == (50_000, "GPU memory free on cuda:0")


def test_format_bytes():
    assert resources.format_bytes(999) == "999 B"
    assert resources.format_bytes(1000) == "1.0 kB"
    assert resources.format_bytes(40_030_400_040) == "40.0 GB"
    assert resources.format_bytes(3e15) == "3.0 PB"
    assert resources.format_bytes(3e21) == "3000000.0 PB"


@pytest.mark.parametrize(
    "key", ["rounds", "rounds_per_call", "eval_batch_size", "client.batch_size", "data.num_clients"]
)
def test_integers_past_int32_are_refused(key, capsys, no_run):
    assert cli.main(["run", f"--config.{key}={2**31}"]) == 2
    assert f"'{key}' must be an int32" in one_error_line(capsys.readouterr().err)


TINY = [
    ("model.student", "mlp-8"),
    ("data.num_clients", "10"),
    ("clients_per_round", "4"),
    ("rounds", "4"),
    ("eval_every", "2"),
    ("client.epochs", "1"),
]


def run_numbers(overrides):
    result = experiment.run(experiment.resolve(overrides=TINY + overrides), progress=False)
    leaves = [np.asarray(a) for a in jax.tree.leaves(result.state)]
    history = [{k: v for k, v in r.items() if k != "wall_s"} for r in result.history]
    return history, leaves


def assert_same_bits(a, b):
    assert a[0] == b[0]
    assert len(a[1]) == len(b[1])
    for x, y in zip(a[1], b[1], strict=True):
        np.testing.assert_array_equal(x, y)


def test_rounds_per_call_past_the_run_is_clipped_with_the_same_bits():
    # One evaluation after 4 rounds: the longest block is 4 rounds. 2**31 - 1
    # would be a metrics buffer of 2**31 rows (an abort inside XLA) without the clip.
    once = [("eval_every", "4")]
    reference = run_numbers([*once, ("rounds_per_call", "4")])
    assert_same_bits(run_numbers([*once, ("rounds_per_call", str(2**31 - 1))]), reference)
    # Blocks of 3 + 1 rounds in a 3-row buffer: the same executable body, the same bits.
    assert_same_bits(run_numbers([*once, ("rounds_per_call", "3")]), reference)


def test_sizing_options_past_the_data_change_no_number():
    config = experiment.resolve(overrides=TINY)
    largest = experiment.build_dataset(config).train.max_examples
    huge = str(10**9)
    clipped = run_numbers(
        [
            ("client_chunk_size", huge),
            ("eval_batch_size", huge),
            ("client.batch_size", huge),
            ("client.max_examples", huge),
        ]
    )
    exact = run_numbers(
        [
            ("client_chunk_size", "0"),  # the whole cohort at once
            ("eval_batch_size", "100000"),  # the whole test set in one batch
            ("client.batch_size", str(largest)),  # one batch per client
            ("client.max_examples", "0"),  # no cap
        ]
    )
    assert_same_bits(clipped, exact)
    assert math.isfinite(clipped[0][-1]["test_accuracy"])


def test_compile_line_shows_the_clipped_rounds_per_call(capsys):
    config = experiment.resolve(overrides=TINY + [("rounds_per_call", "1000000")])
    experiment.run(config, progress=True)
    err = capsys.readouterr().err
    assert "round (4 clients x 1 chunk, 2 rounds per call) ..." in err, err
