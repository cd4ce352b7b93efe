"""The compared methods: the algorithm's vmapped round and its per-client loop and
centralized baselines, built around the same client update."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_kd import aggregate, models
from fedjax_kd.algorithms.fed_avg import fed_avg
from fedjax_kd.algorithms.teacher_student import teacher_student
from fedjax_kd.bench.options import (
    ALGORITHMS,
    METHODS,
    BenchConfig,
    BenchError,
)
from fedjax_kd.bench.workload import create_model
from fedjax_kd.client import batched_apply
from fedjax_kd.data import Cohort

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
    """``apply`` with params and float inputs cast to ``dtype``; logits back in float32.

    Inputs are first prepared as the model would (uint8 pixels to ``[0, 1]``);
    integer token ids are not cast.
    """

    def apply(params, x):
        params = jax.tree.map(lambda p: p.astype(dtype), params)
        x = models.prepare_inputs(x)
        if jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(dtype)
        return apply_fn(params, x).astype(jnp.float32)

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
    student = create_model(config.student, config.bench_input)
    teacher = create_model(config.teacher, config.bench_input)
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
    else:
        algo = fed_avg(student, client_optimizer=client_opt, server_optimizer=server_opt, **common)
    # The baselines run the algorithm's own client update, not a re-creation of it.
    client_update = algo.client_update

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
        return Cohort.from_data(data, chunk_size=chunk)

    def vmap_round(state, cohort, key, chunk=config.chunk_size):
        return algo.round(state, in_chunks(cohort, chunk), key, None)

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
