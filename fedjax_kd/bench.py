"""``fedjax-kd bench``: the vmapped round side by side with a per-client loop and central training.

What is measured
----------------
For each algorithm (``fedavg``; ``teacher_student`` with a frozen teacher) and
each cohort size ``K``, three ways of doing the same work on the same examples,
with the same model, minibatch size, optimizer and number of passes:

* ``vmap``: the algorithm's own round, ``jax.jit(algorithm.round)``, with the
  K clients ``jax.vmap``-ped inside one compiled program. This is what
  ``fedjax-kd run`` executes every round.
* ``loop``: the per-client dispatch of FedJAX-style simulators, built as the
  fastest honest baseline: the very same client update
  (:func:`fedjax_kd.client.make_client_update` with the arguments the
  algorithm gives it) compiled ONCE, then called once per client from a Python
  loop. Each call slices client ``k``'s examples and key out of the same
  stacked cohort (a ``dynamic_slice``, no host work), runs local training
  (for ``teacher_student`` it first computes the frozen teacher's logits on
  that client's examples, in the same compiled call) and adds ``n_k * delta_k``
  to a donated running sum. One compiled call splits the round key into the
  per-client keys (as the algorithm does) and one compiled server step divides
  by ``sum n_k`` and applies the same ``aggregate.server_update``. Calls are
  dispatched asynchronously; the round ends with ``block_until_ready``.
  Nothing is deliberately slowed: fusing the teacher forward, the update and
  the accumulation into one call per client is the fewest dispatches a
  per-client loop can make. The benchmark checks, on every run, that the loop
  and the vmapped round give the same server params after one round from the
  same state and key (``max_abs_diff_vs_vmap`` in the loop's row).
* ``central``: centralized training on the pooled ``K * n`` examples, the
  reference ("the limit"): plain training of one model, here with the same
  client update applied to one "client" holding all examples (one
  ``lax.scan`` over ``epochs * K * n / batch_size`` minibatches of the same
  size), the teacher's logits computed once on all examples, then the same
  server step. It runs exactly as many minibatch steps on as many examples as
  the K clients together (``--examples-per-client`` must be a multiple of
  ``--batch-size``; rows record ``sgd_steps``).

Server-side distillation is OFF (``distill_steps=0``, frozen teacher, and
``kd_start_round=0`` so every timed round distils): the teacher_student rows
measure the client-side cost of knowledge distillation only, which is what the
FLOP prediction below covers. Server distillation is a fixed per-round cost
independent of K (``distill_steps`` teacher steps on the proxy set) and is not
measured here.

Workload
--------
Each of the K clients holds exactly ``n`` (default 64) examples, so nothing is
padded. Examples are drawn from the FedProx Synthetic-IID distribution
(Li et al., arXiv 1812.06127): ``x ~ N(0, diag(j^-1.2))`` in 60 dimensions,
``y = argmax(x W + b)`` with one global ``W, b ~ N(0, 1)`` (10 classes),
drawn directly with NumPy (``seed``) rather than through
:func:`fedjax_kd.data.synthetic`, whose heavy-tailed client sizes would need
padding. Default models: student ``mlp-64``, teacher ``mlp-256-256``;
batch 32, one local epoch, client SGD lr 0.05, server SGD lr 1 (FedAvg).

How it is timed
---------------
All methods of one K are compiled first (``compile_s``: trace + lower +
compile, via ``jax.jit(f).lower(...).compile()``; for ``loop`` the sum of its
three small programs), run once (warm-up and the loop/vmap equality check),
then timed in rotation -- every (algorithm, method) of that K, and the
teacher-forward diagnostic, once per repetition, in the same order -- so that
slow phases of a shared machine hit all methods alike. Each method carries
its own state from round to round (its rounds really train).
In each repetition a method runs a BURST of ``B`` consecutive rounds (each
ending in ``block_until_ready``), as rounds follow one another in a real
simulation; the repetition's time is the burst's time divided by ``B``.
``B`` is the same for every method of one K: ``--burst B``, or by default
``ceil(0.02 s / fastest method's warm-up round)`` clipped to ``[1, 10]``
(8-9 rounds at K=10 in the records, 1 from about K=1000 on; rows record
``burst``). With ``B = 1``
each round runs right after the other methods' rounds, with the caches and
thread pool they left behind; that cold start is a cost a run of consecutive
rounds does not pay, and it weighs most on the fastest (smallest) rounds.
``s_per_round`` is the MEDIAN over ``--reps`` repetitions
(``s_per_round_all`` lists them); ``examples_per_s = epochs * K * n /
s_per_round``. ``peak_rss_mb`` is the process's ``ru_maxrss`` after that
method's last timed round: it is a high-water mark, monotone over the whole
process (it never goes down from one K to the next) and, since methods are
interleaved, shared by the methods of one K rather than attributable to one.

With ``--max-loop-seconds S`` the loop is first timed on a few clients; if its
estimated ``(reps + 1)`` full rounds would take longer than ``S`` seconds its
row has ``null`` numbers and a ``skipped`` note with the estimate: a number is
never extrapolated into the table.

Reading the ratios
------------------
* ``vmap/central`` (examples/s): how close the simulated round comes to
  training one model on the pooled data; 1.0 means simulating K clients costs
  nothing over plain training. It can exceed 1: central's minibatch steps are
  sequential, while vmap runs the K clients' steps as batched matmuls.
* ``vmap/loop``: the speed-up of one compiled vmapped round over per-client
  dispatch of the same compiled client update.
* KD overhead: ``teacher_student`` round time minus ``fedavg`` round time
  (``extra_s``), next to two predictions from the teacher's forward FLOPs
  ``F_teacher * K * n`` per round (forward FLOPs ``F = sum_layers 2 * in *
  out`` per example; the teacher runs once per example per round: its logits
  are computed once, not once per step). They differ in the FLOP rate
  assumed. ``pred@student = fedavg_s * F_teacher / (3 * epochs *
  F_student)`` (a training step counted as 3 forward passes) assumes the
  teacher's wide matmuls run at the FLOP rate of the student's narrow
  training steps. ``pred@teacher = F_teacher * K * n / R_teacher`` uses the
  rate ``R_teacher`` that the teacher's forward pass on the cohort reaches
  when timed alone in the same rotation, in the row's chunks (the whole
  cohort for ``loop`` and ``central``), so it equals that time (JSON
  ``teacher_forward_s``); had the teacher run once per local step,
  ``extra_s`` would be ``epochs`` times larger than it. With
  ``--compare-chunk`` the chunked vmap rows get a KD line of their own.

Knobs (issue item 6): ``--dtype f32,bf16`` runs every method with the models'
params and inputs cast to bfloat16 inside ``apply`` (f32 master params,
gradients and optimizer); ``--donate`` adds a ``vmap`` row whose round donates
the state's buffers (``donate_argnums=0``). Both appear as separate rows
(``dtype``, ``donate``) measured in the same rotation. ``--chunk-size C``
runs the vmap rows' cohort in chunks of C clients (vmap inside a chunk,
``lax.scan`` across chunks, as ``client_chunk_size`` does in ``fedjax-kd
run``; JSON ``chunk_size``); ``--compare-chunk C`` instead ADDS a vmap row
chunked by C beside the unchunked one, in the same rotation, with its own
ratio columns (``cC/central``, ``cC/loop``, ``cC/vmap``). The third knob of
item 6, a block of rounds inside one compiled loop, is not measured here.

Entry points: :func:`add_arguments` + :func:`run` (for the ``fedjax-kd``
command), :func:`main` (``python -m fedjax_kd.bench``), and
:func:`run_benchmark` / :func:`format_table` for library use.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_kd import aggregate, models
from fedjax_kd.algorithms.fed_avg import fed_avg
from fedjax_kd.algorithms.teacher_student import teacher_student
from fedjax_kd.bench_options import (  # noqa: F401 - re-exported: bench's settings and options
    ALGORITHMS,
    AUTO_BURST_S,
    DEFAULT_CLIENTS,
    DTYPES,
    MAX_AUTO_BURST,
    METHODS,
    NUM_CLASSES,
    NUM_FEATURES,
    PROBE_CLIENTS,
    USAGE,
    BenchConfig,
    BenchError,
    add_arguments,
)
from fedjax_kd.cli_util import ErrorParser, fail
from fedjax_kd.client import batched_apply, make_client_update
from fedjax_kd.data import ClientData, Cohort

# --------------------------------------------------------------------------- FLOPs


def forward_flops(name: str, in_features: int, num_classes: int, *, flag: str = "model") -> int:
    """Matmul FLOPs of one example's forward pass: ``sum_layers 2 * in * out``.

    Only dense models (``linear``, ``mlp-W1-...``) are supported by the benchmark.
    """
    try:
        family, widths = models.parse_name(name)
    except ValueError as e:
        raise BenchError(f"{flag}: {e}") from None
    if family not in ("linear", "mlp"):
        raise BenchError(f"{flag}: the benchmark supports linear and mlp-... models, got {name!r}")
    dims = [in_features, *widths, num_classes]
    return sum(2 * a * b for a, b in zip(dims[:-1], dims[1:], strict=True))


# --------------------------------------------------------------------------- data


def make_cohort(num_clients: int, examples_per_client: int, seed: int = 0):
    """K clients of exactly ``n`` Synthetic-IID examples each (NumPy ``ClientData``).

    ``x ~ N(0, diag(j^-1.2))`` (60 features), ``y = argmax(x W + b)`` with one
    global ``W [60, 10], b [10] ~ N(0, 1)`` (FedProx's Synthetic-IID model).
    """
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 1.0, (NUM_FEATURES, NUM_CLASSES))
    b = rng.normal(0.0, 1.0, NUM_CLASSES)
    total = num_clients * examples_per_client
    x = rng.standard_normal((total, NUM_FEATURES), dtype=np.float32)
    x *= np.sqrt(np.arange(1, NUM_FEATURES + 1, dtype=np.float64) ** -1.2).astype(np.float32)
    y = np.empty(total, np.int32)
    for start in range(0, total, 1 << 16):  # float64 logits in bounded chunks
        rows = slice(start, start + (1 << 16))
        y[rows] = np.argmax(x[rows].astype(np.float64) @ w + b, axis=1)
    return ClientData(
        x=x.reshape(num_clients, examples_per_client, NUM_FEATURES),
        y=y.reshape(num_clients, examples_per_client),
        count=np.full((num_clients,), examples_per_client, np.int32),
    )


# --------------------------------------------------------------------------- methods


class Method(NamedTuple):
    """One timed way of running a round.

    Attributes:
      name: ``vmap`` | ``loop`` | ``central`` (or the ``teacher_forward`` diagnostic).
      run: ``run(state, key) -> (state, metrics)`` (asynchronous; block on it).
      compile_s: seconds to trace, lower and compile its program(s).
      state: the state this method's chain of rounds starts from.
      donate: whether the round donates the state's buffers.
      probe: for ``loop``: ``probe(state, key, num_clients)`` runs a partial round.
      chunk: for ``vmap``: clients per chunk (None: the whole cohort at once).
    """

    name: str
    run: Callable
    compile_s: float
    state: Any
    donate: bool = False
    probe: Callable | None = None
    chunk: int | None = None


def _cast_apply(apply_fn, dtype):
    """``apply`` with params and inputs cast to ``dtype``; logits back in float32."""

    def apply(params, x):
        params = jax.tree.map(lambda p: p.astype(dtype), params)
        return apply_fn(params, x.astype(dtype)).astype(jnp.float32)

    return apply


def _compile(fn, *args, donate_argnums=()):
    """``(compiled, seconds)`` for ``jax.jit(fn).lower(*args).compile()``."""
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
    return compiled, time.perf_counter() - start


def build_methods(
    algorithm: str,
    config: BenchConfig,
    cohort,
    key,
    *,
    dtype: str = "f32",
    include: Sequence[str] = (*METHODS, "teacher_forward"),
) -> list[Method]:
    """Builds and compiles the methods of one ``algorithm`` on a device-resident ``cohort``.

    Args:
      algorithm: ``fedavg`` or ``teacher_student``.
      config: the benchmark settings (models, batch size, epochs, lr).
      cohort: a :class:`fedjax_kd.data.ClientData` of jax arrays, no padding.
      key: a round key, used only to fix the compiled programs' argument types.
      dtype: ``f32`` or ``bf16`` compute.
      include: the methods to build (default all).

    Returns:
      ``[vmap, (vmap with donation,) loop, central]`` with compiled programs and
      each its own copy of the same initial state; for ``teacher_student`` also
      ``teacher_forward`` (the teacher's forward pass on the cohort alone, a
      diagnostic reported as ``teacher_forward_s`` in the KD rows).
    """
    if algorithm not in ALGORITHMS:
        raise BenchError(f"unknown algorithm {algorithm!r}")
    num_clients = int(cohort.count.shape[0])
    student = models.create(config.student, feature_shape=(NUM_FEATURES,), num_classes=NUM_CLASSES)
    teacher = models.create(config.teacher, feature_shape=(NUM_FEATURES,), num_classes=NUM_CLASSES)
    if dtype == "bf16":
        student = student._replace(apply=_cast_apply(student.apply, jnp.bfloat16))
        teacher = teacher._replace(apply=_cast_apply(teacher.apply, jnp.bfloat16))
    client_opt, server_opt = optax.sgd(config.lr), optax.sgd(1.0)
    kd = algorithm == "teacher_student"
    common = dict(epochs=config.epochs, batch_size=config.batch_size)
    if kd:
        # Frozen teacher, distillation from round 0: the client-side KD cost only.
        algo = teacher_student(
            student,
            teacher,
            client_optimizer=client_opt,
            server_optimizer=server_opt,
            kd_weight=1.0,
            temperature=1.0,
            kd_start_round=0,
            distill_steps=0,
            **common,
        )
        # The client update exactly as teacher_student builds it.
        client_update = make_client_update(
            student.apply, client_opt, kd_weight=1.0, temperature=1.0, **common
        )
    else:
        algo = fed_avg(student, client_optimizer=client_opt, server_optimizer=server_opt, **common)
        client_update = make_client_update(student.apply, client_opt, **common)

    state0 = jax.jit(algo.init)(jax.random.fold_in(jax.random.key(config.seed), 0))

    def copy_state():
        return jax.tree.map(jnp.copy, state0)

    def finish(state, params, opt_state, train_loss, delta, local_steps):
        """New state and metrics after the server step (as the algorithm's round)."""
        new = state._replace(params=params, opt_state=opt_state)
        if kd:
            new = new._replace(round=state.round + 1)
        finite = aggregate.tree_all_finite(delta) & aggregate.tree_all_finite(params)
        return new, {"train_loss": train_loss, "finite": finite, "local_steps": local_steps}

    def kd_scale_of(state):
        return (state.round >= 0).astype(jnp.float32)  # kd_start_round = 0

    # (a) vmap: the algorithm's own round (clients in chunks of --chunk-size, if set).
    def in_chunks(data, chunk):
        """The stacked cohort as a Cohort gathered ``chunk`` clients at a time."""
        return Cohort(
            jnp.arange(num_clients, dtype=jnp.int32),
            lambda rows: jax.tree.map(lambda a: jnp.take(a, rows, axis=0), data),
            chunk_size=chunk,
        )

    def vmap_round(state, cohort, key, chunk=config.chunk_size):
        if chunk is not None:
            cohort = in_chunks(cohort, chunk)
        return algo.round(state, cohort, key, None)

    variants = [(False, config.chunk_size)]
    if config.donate:
        variants.append((True, config.chunk_size))
    if config.compare_chunk is not None:
        variants.append((False, config.compare_chunk))
    methods = []
    for donate, chunk in variants if "vmap" in include else ():
        compiled, compile_s = _compile(
            lambda s, c, k, chunk=chunk: vmap_round(s, c, k, chunk),
            state0,
            cohort,
            key,
            donate_argnums=(0,) if donate else (),
        )
        methods.append(
            Method(
                "vmap",
                lambda s, k, c=compiled: c(s, cohort, k),
                compile_s,
                copy_state(),
                donate=donate,
                chunk=chunk,
            )
        )

    # (b) loop: the same client update, one compiled call per client.
    def loop_begin(state, key):
        keys = jax.random.split(key, num_clients)  # as the algorithm's round
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        scalar = jnp.zeros((), jnp.float32)
        carry = (zeros, scalar, scalar, jnp.zeros((), jnp.int32))
        return keys, (kd_scale_of(state) if kd else scalar), carry

    def loop_client(carry, params, teacher_params, kd_scale, cohort, keys, k):
        delta_sum, weight_sum, loss_sum, steps = carry
        x, y, count = cohort.x[k], cohort.y[k], cohort.count[k]
        if kd:
            # Once per round, not per step, in the batch's shape as teacher_student does.
            targets = batched_apply(teacher.apply, teacher_params, x, batch_size=config.batch_size)
            out = client_update(params, x, y, count, keys[k], targets, kd_scale)
        else:
            out = client_update(params, x, y, count, keys[k])
        w = aggregate.client_weights(out.weight)
        delta_sum = jax.tree.map(lambda s, d: s + w * d, delta_sum, out.delta)
        return (
            delta_sum,
            weight_sum + w,
            loss_sum + w * out.metrics["train_loss"],
            steps + out.metrics["local_steps"],
        )

    def loop_end(state, carry):
        delta_sum, weight_sum, loss_sum, steps = carry
        total = jnp.maximum(weight_sum, jnp.finfo(jnp.float32).tiny)
        delta = jax.tree.map(lambda s: s / total, delta_sum)
        params, opt_state = aggregate.server_update(
            state.params, state.opt_state, delta, server_opt
        )
        return finish(state, params, opt_state, loss_sum / total, delta, steps)

    if "loop" in include:
        begin_c, begin_s = _compile(loop_begin, state0, key)
        keys0, scale0, carry0 = begin_c(state0, key)
        teacher0 = state0.teacher if kd else None
        client_c, client_s = _compile(
            loop_client,
            carry0,
            state0.params,
            teacher0,
            scale0,
            cohort,
            keys0,
            0,
            donate_argnums=(0,),
        )
        end_c, end_s = _compile(loop_end, state0, carry0)

        def loop_round(state, key, limit=None):
            keys, scale, carry = begin_c(state, key)
            params, teacher_params = state.params, (state.teacher if kd else None)
            for k in range(num_clients if limit is None else limit):
                carry = client_c(carry, params, teacher_params, scale, cohort, keys, k)
            return end_c(state, carry)

        methods.append(
            Method("loop", loop_round, begin_s + client_s + end_s, copy_state(), probe=loop_round)
        )

    # (c) central: the same client update on the pooled examples, then the server step.
    def central_round(state, cohort, key):
        x = cohort.x.reshape(-1, *cohort.x.shape[2:])
        y = cohort.y.reshape(-1)
        count = jnp.sum(cohort.count)
        if kd:
            targets = teacher.apply(state.teacher, x)
            out = client_update(state.params, x, y, count, key, targets, kd_scale_of(state))
        else:
            out = client_update(state.params, x, y, count, key)
        params, opt_state = aggregate.server_update(
            state.params, state.opt_state, out.delta, server_opt
        )
        return finish(
            state,
            params,
            opt_state,
            out.metrics["train_loss"],
            out.delta,
            out.metrics["local_steps"],
        )

    if "central" in include:
        central_c, central_s = _compile(central_round, state0, cohort, key)
        methods.append(
            Method("central", lambda s, k: central_c(s, cohort, k), central_s, copy_state())
        )

    if kd and "teacher_forward" in include:
        # Diagnostic, not a row: the teacher's forward pass alone on the cohort, i.e.
        # what the KD round should add if the teacher runs once per example; in the
        # same chunks as each vmap row (padding rows computed too, as the round does).
        def teacher_forward(teacher_params, cohort, chunk):
            forward = jax.vmap(
                lambda t, x: batched_apply(teacher.apply, t, x, batch_size=config.batch_size),
                in_axes=(None, 0),
            )
            if chunk is None:
                return forward(teacher_params, cohort.x)

            def chunk_fn(carry, clients, inputs, valid):  # the round's chunks, forward only
                return carry, {}, forward(teacher_params, clients.x)

            return aggregate.scan_over_chunks(chunk_fn, in_chunks(cohort, chunk), {}, ())[2]

        for chunk in dict.fromkeys([None, *(c for _, c in variants)]):  # None: loop, central
            forward_c, forward_s = _compile(
                lambda t, c, chunk=chunk: teacher_forward(t, c, chunk), state0.teacher, cohort
            )
            methods.append(
                Method(
                    "teacher_forward",
                    lambda t, k, f=forward_c: (t, f(t, cohort)),
                    forward_s,
                    jax.tree.map(jnp.copy, state0.teacher),
                    chunk=chunk,
                )
            )
    return methods


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
    f_student = forward_flops(config.student, NUM_FEATURES, NUM_CLASSES)
    f_teacher = forward_flops(config.teacher, NUM_FEATURES, NUM_CLASSES)
    device = jax.devices()[0]
    rows: list[dict] = []
    root = jax.random.key(config.seed)
    for num_clients in config.clients:
        cohort = jax.tree.map(jnp.asarray, make_cohort(num_clients, n, config.seed))
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
        "server_distill_steps": 0,
        "platform": device.platform,
        "device_kind": getattr(device, "device_kind", ""),
        "cpu_count": os.cpu_count(),
        **e.extra,
    }
    if e.skipped:
        row["skipped"] = e.skipped
    return row


# --------------------------------------------------------------------------- table


def _fmt(value, spec: str) -> str:
    """``format(value, spec)``, or a right-aligned ``-`` of the same width for None."""
    if value is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width or 0))
    return format(value, spec)


def _method_label(row: dict) -> str:
    """``vmap``, ``vmap+donate``, ``vmap/c100`` (a chunked vmap row), ``loop``, ..."""
    label = row["method"] + ("+donate" if row.get("donate") else "")
    if row.get("chunk_size"):
        label += f"/c{row['chunk_size']}"
    return label


def format_table(rows: Sequence[dict]) -> str:
    """The printed summary: timings, vmap ratios per (algorithm, K) and the KD overhead."""
    lines = [
        f"{'algorithm':<16}{'dtype':<6}{'K':>7}  {'method':<13}{'examples/s':>12}"
        f"{'s/round':>11}{'compile_s':>10}{'peak_rss_MB':>12}",
    ]
    for r in rows:
        method = _method_label(r)
        lines.append(
            f"{r['algorithm']:<16}{r['dtype']:<6}{r['clients']:>7}  {method:<13}"
            f"{_fmt(r['examples_per_s'], '12,.0f')}{_fmt(r['s_per_round'], '11.4f')}"
            f"{r['compile_s']:>10.2f}{r['peak_rss_mb']:>12.0f}"
            + (f"  ({r['skipped']})" if r.get("skipped") else "")
        )
    index = {
        (r["algorithm"], r["dtype"], r["clients"], r["method"], r["donate"]): r
        for r in rows
        if not r.get("compare_chunk")
    }
    compared = {
        (r["algorithm"], r["dtype"], r["clients"]): r for r in rows if r.get("compare_chunk")
    }
    chunk_label = next((f"c{r['chunk_size']}" for r in compared.values()), None)

    def eps(*k):
        r = index.get(k)
        return r["examples_per_s"] if r else None

    def ratio(a, b):
        return None if a is None or b is None else a / b

    has_donate = any(r.get("donate") for r in rows)
    has_bf16 = any(r["dtype"] == "bf16" for r in rows)
    lines += [
        "",
        "ratios of examples/s (> 1: vmap faster)",
        f"{'algorithm':<16}{'dtype':<6}{'K':>7}{'vmap/central':>14}{'vmap/loop':>11}"
        + (f"{'donate/vmap':>13}" if has_donate else "")
        + (
            f"{chunk_label + '/central':>14}{chunk_label + '/loop':>11}{chunk_label + '/vmap':>11}"
            if chunk_label
            else ""
        )
        + (f"{'vmap bf16/f32':>15}" if has_bf16 else ""),
    ]
    groups = sorted({(r["algorithm"], r["dtype"], r["clients"]) for r in rows}, key=_group_order)
    for alg, dtype, k in groups:
        vmap = eps(alg, dtype, k, "vmap", False)
        to_central = ratio(vmap, eps(alg, dtype, k, "central", False))
        to_loop = ratio(vmap, eps(alg, dtype, k, "loop", False))
        line = f"{alg:<16}{dtype:<6}{k:>7}{_fmt(to_central, '14.2f')}{_fmt(to_loop, '11.2f')}"
        if has_donate:
            line += _fmt(ratio(eps(alg, dtype, k, "vmap", True), vmap), "13.2f")
        if chunk_label:
            row = compared.get((alg, dtype, k))
            chunked = row["examples_per_s"] if row else None
            line += _fmt(ratio(chunked, eps(alg, dtype, k, "central", False)), "14.2f")
            line += _fmt(ratio(chunked, eps(alg, dtype, k, "loop", False)), "11.2f")
            line += _fmt(ratio(chunked, vmap), "11.2f")
        if has_bf16:
            f32 = eps(alg, "f32", k, "vmap", False)
            line += _fmt(ratio(vmap, f32) if dtype == "bf16" else None, "15.2f")
        lines.append(line)
    kd_lines = []
    for dtype, k in sorted(
        {(d, k) for _, d, k in groups}, key=lambda t: (DTYPES.index(t[0]), t[1])
    ):
        pairs = [
            (
                m,
                index.get(("fedavg", dtype, k, m, False)),
                index.get(("teacher_student", dtype, k, m, False)),
            )
            for m in METHODS
        ]
        if chunk_label:
            pairs.insert(
                1,
                (
                    f"vmap/{chunk_label}",
                    compared.get(("fedavg", dtype, k)),
                    compared.get(("teacher_student", dtype, k)),
                ),
            )
        for method, fa, ts in pairs:
            if not fa or not ts or not fa["s_per_round"] or not ts["s_per_round"]:
                continue
            student_train = fa["flops_per_round"]
            teacher_fwd = ts["flops_per_round"] - student_train
            extra = ts["s_per_round"] - fa["s_per_round"]
            at_student = fa["s_per_round"] * teacher_fwd / student_train
            at_teacher = ts.get("teacher_forward_s")
            kd_lines.append(
                f"{dtype:<6}{k:>7}  {method:<10}"
                f"{fa['s_per_round']:>10.4f}{ts['s_per_round']:>11.4f}"
                f"{extra:>11.4f}{at_student:>14.4f}{extra / at_student:>9.2f}"
                f"{_fmt(at_teacher, '14.4f')}{_fmt(ratio(extra, at_teacher), '9.2f')}"
            )
    if kd_lines:
        ts_row = next(r for r in rows if r["algorithm"] == "teacher_student")
        f_teacher = ts_row["teacher_forward_flops"]
        f_train = 3 * ts_row["epochs"] * ts_row["student_forward_flops"]
        lines += [
            "",
            "KD overhead: extra_s = teacher_student round - fedavg round (frozen teacher, "
            "server distillation off), predicted from the teacher's forward FLOPs "
            "(once per example per round) at two FLOP rates:",
            "  pred@student = fedavg_s * teacher forward FLOPs / student training FLOPs = "
            f"fedavg_s * {f_teacher:,} / {f_train:,} = fedavg_s * {f_teacher / f_train:.2f} "
            "(the student training step's FLOP rate)",
            "  pred@teacher = teacher forward FLOPs / the FLOP rate of the teacher's forward "
            "on the cohort timed alone, in the row's chunks (= its time)",
            f"{'dtype':<6}{'K':>7}  {'method':<10}{'fedavg_s':>10}{'kd_s':>11}{'extra_s':>11}"
            f"{'pred@student':>14}{'ratio':>9}{'pred@teacher':>14}{'ratio':>9}",
            *kd_lines,
        ]
    return "\n".join(lines)


def _group_order(group):
    alg, dtype, k = group
    return (ALGORITHMS.index(alg), DTYPES.index(dtype), k)


# --------------------------------------------------------------------------- CLI


def run(args: argparse.Namespace) -> int:
    """Runs ``fedjax-kd bench`` with parsed ``args``; returns the exit code."""
    config = BenchConfig(
        clients=tuple(args.clients),
        algorithms=tuple(args.algorithms),
        reps=args.reps,
        examples_per_client=args.examples_per_client,
        batch_size=args.batch_size,
        epochs=args.epochs,
        lr=args.lr,
        student=args.student,
        teacher=args.teacher,
        max_loop_seconds=args.max_loop_seconds,
        dtypes=tuple(args.dtype),
        donate=args.donate,
        chunk_size=args.chunk_size,
        compare_chunk=args.compare_chunk,
        burst=args.burst,
        seed=args.seed,
    )
    try:
        config.validate()
    except BenchError as e:
        return fail(str(e))
    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            return fail(f"--json: directory {parent} does not exist")
    try:
        rows = run_benchmark(config)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m fedjax_kd.bench [options]``."""
    parser = ErrorParser(prog="fedjax-kd bench", usage=USAGE, description=__doc__.split("\n")[0])
    add_arguments(parser)
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argument mistakes (2) and --help (0)
        return int(e.code or 0)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
