"""Local training of one client as a pure function.

``make_client_update`` closes over the hyperparameters and returns
``client_update(params, x, y, count, key, targets=None) -> ClientOutput``
for ONE client; algorithms ``jax.vmap`` it over the cohort. Both it and
algorithms with other local objectives (FedKD's mutual distillation, FedMD's
digest phase) build on :func:`local_train`, which owns batching and padding.

Local training runs ``epochs`` passes of minibatches of ``batch_size`` as one
``lax.scan`` over ``epochs * ceil(N / batch_size)`` steps, where ``N`` is the
padded number of examples. The local objective of a batch is

    mean_i [task_weight * CE(f(x_i), y_i) + kd_weight * D(f(x_i), t_i, y_i)]
      + (prox_mu / 2) * ||w - w_global||^2

with ``D`` by default ``T^2 KL(softmax(t_i/T) || softmax(f(x_i)/T))`` and
``t_i`` per-example targets (e.g. a frozen teacher's logits, computed once per
round by the caller, not once per step)

with the mean over the batch's real examples (FedProx: Li et al., MLSys 2020,
arXiv 1812.06127; distillation: Hinton et al., arXiv 1503.02531).

Padding is exact, not approximate:

* Each epoch's shuffle draws one uniform number per example position from
  ``fold_in(fold_in(key, epoch), position)`` and puts the real examples first
  in that random order, so the order of the real examples does not depend on
  how much padding follows them.
* Padded examples enter every loss with weight exactly 0.
* A step whose batch holds no real example leaves params and optimizer state
  untouched (``jnp.where``), so trailing padded steps are no-ops.

A client padded to 40 examples therefore returns bit-identical results to the
same client padded to 400 (with ``batch_size < 40``: with ``N <= batch_size``
the client is one batch of ``N`` rows, another shape; per-round forward passes
over the client use :func:`map_batches` for the same reason).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_kd import losses
from fedjax_kd.types import ApplyFn, ClientOutput, Params

ClientUpdateFn = Callable[..., ClientOutput]


def epoch_order(key: jax.Array, count: jax.Array, num_examples: int) -> jax.Array:
    """Random order of positions ``0..num_examples-1`` with real ones first.

    Args:
      key: the client's key for this epoch.
      count: number of real examples (positions ``< count`` are real).
      num_examples: padded length ``N`` (static).

    Returns:
      int32 ``[N]`` permutation; its first ``count`` entries are a uniformly
      random permutation of ``0..count-1`` that does not depend on ``N``.
    """
    positions = jnp.arange(num_examples)
    u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(positions)
    # Padded positions sort after every real one (u < 1 <= 2).
    return jnp.argsort(jnp.where(positions < count, u, 2.0), stable=True).astype(jnp.int32)


def _num_local_steps(num_examples: int, *, epochs: int, batch_size: int) -> int:
    """Number of scan steps for a padded client of ``num_examples``."""
    return epochs * math.ceil(num_examples / batch_size)


def _blocks(examples: dict[str, jax.Array], batch_size: int) -> tuple[dict, int, int]:
    """``examples`` ``[N, ...]`` as ``[ceil(N / b), b, ...]`` blocks, ``b = min(B, N)``.

    The block size is the training batch of :func:`local_train`; trailing rows
    of the last block are zeros.
    """
    num_examples = jax.tree.leaves(examples)[0].shape[0]
    block = max(1, min(batch_size, num_examples))
    num_blocks = math.ceil(num_examples / block)
    pad = num_blocks * block - num_examples

    def split(a):
        a = jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1))
        return a.reshape(num_blocks, block, *a.shape[1:])

    return jax.tree.map(split, examples), num_examples, block


def map_batches(fn: Callable, examples: dict[str, jax.Array], *, batch_size: int):
    """``fn`` over a client's examples in blocks of the training batch's shape.

    A per-round forward pass over a padded client (a frozen teacher's logits,
    the downloaded global model's, FD's per-label statistics) computed on the
    whole ``[N, ...]`` array would run a matmul of ``N`` rows, and XLA's CPU
    kernels give a row's result differently in the last bit depending on the
    number of rows (seen on AVX2 and AVX-512 machines). Here ``fn`` sees
    blocks of ``b = min(batch_size, N)`` rows, one after another
    (``lax.map``), so a real example's output comes from the same program on
    the same shapes however much padding follows it: the results are
    bit-identical across paddings ``N, N' > batch_size``, like the training
    steps of :func:`local_train`, whose batches have the same shape. (With
    ``N <= batch_size`` there is one block, and XLA compiles a loop of one
    iteration as its body alone, which can round differently.)

    Args:
      fn: ``fn(block) -> pytree`` with leading axis ``b``; ``block`` holds the
        ``examples`` entries, ``[b, ...]`` each.
      examples: per-example arrays with a leading axis ``N``.
      batch_size: the block size ``B`` (static; the client's batch size).

    Returns:
      ``fn``'s outputs for all ``N`` rows, concatenated (``[N, ...]``).
    """
    blocks, num_examples, _ = _blocks(examples, batch_size)
    out = jax.lax.map(fn, blocks)
    return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:])[:num_examples], out)


def sum_batches(fn: Callable, examples: dict[str, jax.Array], count, *, batch_size: int):
    """Sum of ``fn(block, valid)`` over a client's blocks of the batch's shape.

    Like :func:`map_batches` (blocks of ``b = min(batch_size, N)`` rows), but
    ``fn`` reduces its block (``valid`` is the bool ``[b]`` mask of real
    examples, positions ``< count``; with per-position labels ``y`` ``[b, T]``
    it is the ``[b, T]`` mask of real targets, :func:`_targets_valid`) and the
    block results are added one after
    another: padded blocks add exact zeros when ``fn`` masks them out, so the
    sum is bit-identical across paddings ``N, N' > batch_size``, which a
    reduction over the whole ``N`` axis is not.

    Args:
      fn: ``fn(block, valid) -> pytree`` of sums over the block's real rows;
        it must mask with ``jnp.where`` (padded rows may hold anything).
      examples: per-example arrays with a leading axis ``N``.
      count: number of real examples (positions ``< count``; may be traced).
      batch_size: the block size ``B`` (static; the client's batch size).

    Returns:
      The sum over blocks of ``fn``'s pytree (zeros for a client with no rows).
    """
    blocks, num_examples, block = _blocks(examples, batch_size)
    num_blocks = jax.tree.leaves(blocks)[0].shape[0]
    position = jnp.arange(num_blocks * block).reshape(num_blocks, block)
    # Rows added to fill the last block are never real, whatever count says.
    valid = (position < count) & (position < num_examples)

    def add(total, inputs):
        blk, ok = inputs
        return jax.tree.map(jnp.add, total, fn(blk, _targets_valid(blk, ok))), None

    one_block = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), blocks)
    ok_shape = one_block["y"].shape if "y" in one_block else (block,)
    out = jax.eval_shape(fn, one_block, jax.ShapeDtypeStruct(ok_shape, jnp.bool_))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out)
    total, _ = jax.lax.scan(add, zeros, (blocks, valid))
    return total


def batched_apply(apply_fn: ApplyFn, params: Params, x: jax.Array, *, batch_size: int):
    """``apply_fn(params, x)`` on a client's ``[N, ...]`` inputs, block by block.

    The per-round targets of the distillation algorithms (a frozen teacher's
    logits in teacher_student, the global model's in FedNTD) are computed
    with this, in the training batch's shape: see :func:`map_batches`.
    """
    return map_batches(lambda b: apply_fn(params, b["x"]), {"x": x}, batch_size=batch_size)


def _targets_valid(batch: dict, valid: jax.Array) -> jax.Array:
    """``valid`` (real examples, ``[B]``) as the mask ``loss_fn`` gets.

    With labels ``batch["y"]`` of shape ``[B, T]`` (next-token targets) it is
    the ``[B, T]`` mask of real targets (:func:`fedjax_kd.losses.target_mask`:
    padding positions carry no loss). Without labels but with per-position
    ``batch["targets"]`` (``[B, T, C]``: a public set of sequences, FedMD's
    and DS-FL's digest) it is ``valid`` over every position, ``[B, T]``, so
    the monitoring loss is a mean over positions too. Otherwise ``valid``.
    """
    y = batch.get("y")
    if y is not None:
        return valid if y.ndim == valid.ndim else losses.target_mask(y, valid)
    targets = batch.get("targets")
    if targets is not None and targets.ndim > valid.ndim + 1:
        shape = targets.shape[:-1]
        return jnp.broadcast_to(valid.reshape(valid.shape + (1,) * (len(shape) - 1)), shape)
    return valid


def _tree_sq_norm(tree: Params) -> jax.Array:
    """Squared L2 norm of a pytree."""
    return sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree))


def local_train(
    loss_fn: Callable,
    params: Params,
    optimizer: optax.GradientTransformation,
    examples: dict[str, jax.Array],
    count: jax.Array,
    key: jax.Array,
    *,
    epochs: int,
    batch_size: int,
    num_epochs: jax.Array | None = None,
) -> tuple[Params, dict[str, jax.Array]]:
    """Runs ``epochs`` of shuffled minibatch steps as one ``lax.scan``.

    The building block of every client's local training (and of server-side
    distillation): it owns batching, the exact-padding rules described in the
    module docstring, and the optimizer; ``loss_fn`` owns the objective.

    Args:
      loss_fn: ``loss_fn(params, batch, valid) -> (loss, task_sum)`` where
        ``batch`` holds the ``examples`` entries indexed by the minibatch
        (``[B, ...]`` each), ``valid`` is the bool ``[B]`` mask of real
        examples (``[B, T]``, the real targets, when ``examples["y"]`` holds
        per-position targets ``[N, T]``), ``loss`` is the scalar to minimise
        and ``task_sum`` the sum of a per-example (per-target) monitoring loss
        over the real examples (targets).
      params: initial parameters (any pytree).
      optimizer: optax optimizer; its state starts fresh.
      examples: per-example arrays with a leading axis ``N`` (e.g. ``x``,
        ``y``, teacher logits).
      count: number of real examples (positions ``< count``).
      key: the client's key; epoch ``e`` shuffles with ``fold_in(key, e)``.
      epochs: passes over the data (static).
      batch_size: minibatch size (static).
      num_epochs: optional (traced) number of epochs this client actually
        runs, ``1 <= num_epochs <= epochs`` (FedProx's stragglers); steps of
        later epochs are no-ops, exactly like padded steps.

    Returns:
      ``(final_params, metrics)`` with metrics ``train_loss`` (mean of the
      monitoring loss over the examples, or targets, seen) and ``local_steps``
      (steps with at least one real example).
    """
    num_examples = jax.tree.leaves(examples)[0].shape[0]
    # A batch larger than the client is the whole client: no need to pad past N.
    batch_size = max(1, min(batch_size, num_examples))
    steps_per_epoch = math.ceil(num_examples / batch_size)
    padded_len = steps_per_epoch * batch_size
    orders = jax.vmap(lambda e: epoch_order(jax.random.fold_in(key, e), count, num_examples))(
        jnp.arange(epochs)
    )
    orders = jnp.pad(orders, ((0, 0), (0, padded_len - num_examples)))
    batch_idx = orders.reshape(epochs * steps_per_epoch, batch_size)
    slot = jnp.arange(padded_len).reshape(steps_per_epoch, batch_size)
    batch_valid = jnp.tile(slot < count, (epochs, 1))
    if num_epochs is not None:
        epoch_of_step = jnp.repeat(jnp.arange(epochs), steps_per_epoch)
        batch_valid = batch_valid & (epoch_of_step < num_epochs)[:, None]
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def step(carry, inputs):
        local, opt_state, loss_sum = carry
        idx, valid = inputs
        batch = jax.tree.map(lambda a: a[idx], examples)
        valid = _targets_valid(batch, valid)
        grads, task_sum = grad_fn(local, batch, valid)
        updates, new_opt_state = optimizer.update(grads, opt_state, local)
        new_local = optax.apply_updates(local, updates)
        has_real = jnp.any(valid)
        keep = lambda new, old: jnp.where(has_real, new, old)  # noqa: E731
        local = jax.tree.map(keep, new_local, local)
        opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        seen = jnp.sum(valid, dtype=jnp.int32)
        return (local, opt_state, loss_sum + task_sum), (has_real, seen)

    init = (params, optimizer.init(params), jnp.zeros((), jnp.float32))
    (local, _, loss_sum), (has_real, seen) = jax.lax.scan(step, init, (batch_idx, batch_valid))
    # Real examples (targets) over the steps run: count * epochs for labels [N].
    seen = jnp.maximum(jnp.sum(seen), 1).astype(jnp.float32)
    metrics = {
        "train_loss": loss_sum / seen,
        "local_steps": jnp.sum(has_real).astype(jnp.int32),
    }
    return local, metrics


def kl_distill_fn(temperature: float) -> Callable:
    """``distill_fn`` of Hinton et al.: ``T^2 KL(softmax(t/T) || softmax(s/T))``."""

    def distill(student_logits, targets, labels):
        del labels
        return losses.distillation_loss(student_logits, targets, temperature)

    return distill


def make_client_update(
    apply_fn: ApplyFn,
    optimizer: optax.GradientTransformation,
    *,
    epochs: int,
    batch_size: int,
    prox_mu: float = 0.0,
    kd_weight: float = 0.0,
    temperature: float = 1.0,
    distill_fn: Callable | None = None,
    task_weight: float = 1.0,
) -> ClientUpdateFn:
    """Builds the local training function of one client.

    Args:
      apply_fn: ``apply(params, x) -> logits`` of the model trained locally.
      optimizer: client optimizer (e.g. ``optax.sgd(lr)``); its state is fresh
        every round, as in FedAvg.
      epochs: local epochs ``E >= 1``.
      batch_size: minibatch size ``B >= 1``.
      prox_mu: FedProx proximal weight ``mu >= 0`` (0 = FedAvg).
      kd_weight: weight of the distillation term; when > 0 the client update
        needs per-example ``targets`` (e.g. a frozen teacher's logits).
      temperature: temperature of the default distillation term.
      distill_fn: ``distill_fn(student_logits, targets, labels) -> [B]``; the
        per-example distillation loss (default: :func:`kl_distill_fn`).
      task_weight: weight of the cross-entropy task loss (0 for pure
        distillation, e.g. FedMD's digest phase).

    Returns:
      ``client_update(params, x, y, count, key, targets=None, kd_scale=1.0,
      num_epochs=None)`` where ``x`` is ``[N, ...]``, ``y`` is ``[N]``,
      ``count`` the number of real examples, ``targets`` ``[N, ...]``
      per-example distillation targets, ``kd_scale`` a (traced) factor on the
      distillation term and ``num_epochs`` an optional (traced) number of
      epochs ``<= epochs`` this client runs (a straggler's partial work),
      returning a
      :class:`~fedjax_kd.types.ClientOutput` with ``delta = params -
      local_params``, ``weight = count`` and metrics ``train_loss`` (mean task
      loss over the examples seen) and ``local_steps``.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    use_kd = kd_weight > 0
    distill = distill_fn if distill_fn is not None else kl_distill_fn(temperature)

    def loss_fn(local, batch, valid, global_params, kd_scale):
        logits = apply_fn(local, batch["x"])
        task = losses.cross_entropy(logits, batch["y"])
        per_example = task_weight * task
        if use_kd:
            kd = distill(logits, batch["targets"], batch["y"])
            per_example = per_example + kd_scale * kd_weight * kd
        loss = losses.masked_mean(per_example, valid)
        if prox_mu > 0:
            diff = jax.tree.map(jnp.subtract, local, global_params)
            loss = loss + 0.5 * prox_mu * _tree_sq_norm(diff)
        return loss, jnp.sum(jnp.where(valid, task, 0.0))

    def client_update(
        params, x, y, count, key, targets=None, kd_scale=1.0, num_epochs=None
    ) -> ClientOutput:
        examples = {"x": x, "y": y}
        if use_kd:
            if targets is None:
                raise ValueError("kd_weight > 0: client_update needs per-example targets")
            examples["targets"] = targets
        local, metrics = local_train(
            functools.partial(loss_fn, global_params=params, kd_scale=kd_scale),
            params,
            optimizer,
            examples,
            count,
            key,
            epochs=epochs,
            batch_size=batch_size,
            num_epochs=num_epochs,
        )
        delta = jax.tree.map(jnp.subtract, params, local)
        return ClientOutput(delta=delta, weight=count.astype(jnp.float32), metrics=metrics)

    return client_update
