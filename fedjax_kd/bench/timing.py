"""Timing: compile, warm up, time the methods in rotation in bursts, one row per method."""

from __future__ import annotations

import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_kd.bench.methods import Method, build_methods
from fedjax_kd.bench.options import (
    AUTO_BURST_S,
    MAX_AUTO_BURST,
    METHODS,
    PROBE_CLIENTS,
    BenchConfig,
)
from fedjax_kd.bench.table import _method_label
from fedjax_kd.bench.workload import flops_source, make_cohort, model_flops

# --------------------------------------------------------------------------- timing


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB else


def _max_abs_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@dataclass
class _Entry:
    """Bookkeeping of one timed (algorithm, dtype, method) at one K."""

    algorithm: str
    dtype: str
    method: Method
    state: Any
    times: list[float] = field(default_factory=list)
    rss: float = 0.0
    skipped: str | None = None
    extra: dict = field(default_factory=dict)


def run_benchmark(config: BenchConfig, *, log: Callable[[str], None] | None = None) -> list[dict]:
    """Runs the benchmark; returns the JSON rows (see the module docstring)."""
    config.validate()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    n = config.examples_per_client
    bench_input = config.bench_input
    f_student = model_flops(config.student, bench_input, flag="--student")
    f_teacher = model_flops(config.teacher, bench_input, flag="--teacher")
    device = jax.devices()[0]
    rows: list[dict] = []
    root = jax.random.key(config.seed)
    for num_clients in config.clients:
        cohort = jax.tree.map(jnp.asarray, make_cohort(num_clients, n, config.seed, bench_input))
        warm_key = jax.random.fold_in(root, 1)
        entries: list[_Entry] = []
        for algorithm in config.algorithms:
            for dtype in config.dtypes:
                methods = build_methods(algorithm, config, cohort, warm_key, dtype=dtype)
                entries.extend(_Entry(algorithm, dtype, m, m.state) for m in methods)
                log(
                    f"K={num_clients} {algorithm} {dtype}: compiled "
                    + ", ".join(
                        f"{m.name}{'+donate' if m.donate else ''}"
                        f"{f'/c{m.chunk}' if m.chunk else ''} {m.compile_s:.2f}s"
                        for m in methods
                    )
                )
        _warm_up(entries, warm_key, config, num_clients, log)
        burst = config.burst or _auto_burst(entries)
        _skip_slow_loops(entries, config, burst, num_clients, log)
        for e in entries:
            e.extra["burst"] = burst  # skipped rows too: the burst their K was timed with
        # Round r of the timed chain uses key fold_in(root, r + 2) in every method.
        round_keys = [jax.random.fold_in(root, r + 2) for r in range(config.reps * burst)]
        for rep in range(config.reps):
            for e in entries:
                if e.skipped:
                    continue
                start = time.perf_counter()
                for b in range(burst):
                    e.state, metrics = e.method.run(e.state, round_keys[rep * burst + b])
                    jax.block_until_ready((e.state, metrics))
                e.times.append((time.perf_counter() - start) / burst)
                if rep == config.reps - 1:
                    e.rss = _peak_rss_mb()
        forward_s = {
            (e.dtype, e.method.chunk): statistics.median(e.times)
            for e in entries
            if e.method.name not in METHODS
        }
        for e in entries:
            if e.method.name in METHODS:
                row = _row(e, config, num_clients, f_student, f_teacher, device)
                if e.algorithm == "teacher_student":
                    # The forward pass in the row's own chunks (loop/central: unchunked).
                    chunk = e.method.chunk if e.method.name == "vmap" else None
                    row["teacher_forward_s"] = forward_s.get((e.dtype, chunk))
                    row["teacher_forward_chunk"] = chunk
                rows.append(row)
        log(
            f"K={num_clients}: "
            + ", ".join(
                f"{r['algorithm']}/{_method_label(r)}"
                f"{'/bf16' if r['dtype'] == 'bf16' else ''} "
                + (f"{r['s_per_round']:.4f}s" if r["s_per_round"] else "skipped")
                for r in rows
                if r["clients"] == num_clients
            )
        )
        del entries, cohort
    return rows


def _auto_burst(entries) -> int:
    """Rounds per burst: ``ceil(AUTO_BURST_S / fastest warm-up round)`` in ``[1, 10]``.

    Only rounds count (``vmap``, ``loop``, ``central``), not the teacher-forward
    diagnostic.
    """
    times = [
        e.extra["first_round_s"]
        for e in entries
        if e.method.name in METHODS and "first_round_s" in e.extra
    ]
    fastest = max(min(times, default=AUTO_BURST_S), 1e-6)
    return int(min(MAX_AUTO_BURST, max(1, math.ceil(AUTO_BURST_S / fastest))))


def _loop_skip_note(estimate: float, rounds: int, probe: int, limit: float) -> str:
    return (
        f"skipped: the loop's {rounds} rounds would take about {estimate * rounds:.0f} s "
        f"(estimated from {probe} clients) > --max-loop-seconds {limit:g}"
    )


def _skip_slow_loops(entries, config, burst, num_clients, log) -> None:
    """Applies --max-loop-seconds once the burst is known (warm-up + reps * burst rounds)."""
    rounds = config.reps * burst + 1
    for e in entries:
        estimate = e.extra.get("loop_estimate_s")
        if e.skipped or estimate is None or estimate * rounds <= config.max_loop_seconds:
            continue
        probe = min(num_clients, PROBE_CLIENTS)
        e.skipped = _loop_skip_note(estimate, rounds, probe, config.max_loop_seconds)
        log(f"K={num_clients} {e.algorithm} loop {e.skipped}")


def _warm_up(entries, key, config, num_clients, log) -> None:
    """First round of every method; checks loop == vmap; applies --max-loop-seconds."""
    vmap_out = {}
    for e in entries:
        m = e.method
        if m.name == "loop" and config.max_loop_seconds is not None:
            probe = min(num_clients, PROBE_CLIENTS)
            jax.block_until_ready(m.probe(e.state, key, probe))  # warm the dispatch path
            start = time.perf_counter()
            jax.block_until_ready(m.probe(e.state, key, probe))
            estimate = (time.perf_counter() - start) * num_clients / probe
            e.extra["loop_estimate_s"] = round(estimate, 4)
            rounds = config.reps * (config.burst or 1) + 1
            if estimate * rounds > config.max_loop_seconds:
                e.skipped = _loop_skip_note(estimate, rounds, probe, config.max_loop_seconds)
                log(f"K={num_clients} {e.algorithm} loop {e.skipped}")
                continue
        start = time.perf_counter()
        new_state, metrics = m.run(e.state, key)
        jax.block_until_ready((new_state, metrics))
        e.extra["first_round_s"] = round(time.perf_counter() - start, 6)
        e.state = new_state
        group = (e.algorithm, e.dtype)
        if m.name == "vmap" and not m.donate and m.chunk == config.chunk_size:
            vmap_out[group] = new_state.params
        if m.name in ("loop", "central"):
            e.extra["sgd_steps"] = int(metrics["local_steps"])
        if m.name == "loop" and group in vmap_out:
            # Same initial state and key: the baseline must be the same computation.
            e.extra["max_abs_diff_vs_vmap"] = _max_abs_diff(new_state.params, vmap_out[group])


def _row(e: _Entry, config: BenchConfig, num_clients, f_student, f_teacher, device) -> dict:
    n, epochs = config.examples_per_client, config.epochs
    bench_input = config.bench_input
    examples = epochs * num_clients * n
    flops = num_clients * n * (3 * epochs * f_student)
    if e.algorithm == "teacher_student":
        flops += num_clients * n * f_teacher
    s = statistics.median(e.times) if e.times else None
    row = {
        "algorithm": e.algorithm,
        "clients": num_clients,
        "method": e.method.name,
        "examples_per_s": examples / s if s else None,
        "s_per_round": s,
        "compile_s": e.method.compile_s,
        "peak_rss_mb": e.rss or _peak_rss_mb(),
        "reps": len(e.times),
        "n_per_client": n,
        "batch_size": config.batch_size,
        "epochs": epochs,
        "examples_per_round": examples,
        "sgd_steps": e.extra.pop(
            "sgd_steps", num_clients * epochs * math.ceil(n / config.batch_size)
        ),
        "flops_per_round": flops,
        "student_forward_flops": f_student,
        "teacher_forward_flops": f_teacher,
        "gflops_per_s": flops / s / 1e9 if s else None,
        "s_per_round_all": [round(t, 6) for t in e.times],
        "dtype": e.dtype,
        "donate": e.method.donate,
        "chunk_size": e.method.chunk if e.method.name == "vmap" else None,
        # The extra vmap row of --compare-chunk (not the main vmap row).
        "compare_chunk": e.method.name == "vmap" and e.method.chunk != config.chunk_size,
        "student": config.student,
        "teacher": config.teacher if e.algorithm == "teacher_student" else None,
        # What was trained on: runs on different inputs or models tell themselves apart.
        "input": bench_input.text,
        "input_kind": bench_input.kind,
        "input_shape": list(bench_input.shape),
        "input_dtype": bench_input.dtype,
        "num_classes": bench_input.num_classes,
        "student_flops_source": flops_source(config.student),
        "teacher_flops_source": flops_source(config.teacher),
        "teacher_model": config.teacher,  # the run's --teacher, in fedavg rows too
        "server_distill_steps": 0,
        "platform": device.platform,
        "device_kind": getattr(device, "device_kind", ""),
        "cpu_count": os.cpu_count(),
        **e.extra,
    }
    if e.skipped:
        row["skipped"] = e.skipped
    return row
