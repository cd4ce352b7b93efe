"""Local training of one client as a pure function.

``make_client_update`` closes over the hyperparameters and returns
``client_update(params, x, y, count, key, teacher_params=None) -> ClientOutput``
for ONE client; algorithms ``jax.vmap`` it over the cohort.

Local training runs ``epochs`` passes of minibatches of ``batch_size`` as one
``lax.scan`` over ``epochs * ceil(N / batch_size)`` steps, where ``N`` is the
padded number of examples. The local objective of a batch is

    mean_i [CE(f(x_i), y_i) + kd_weight * T^2 KL(softmax(t_i/T) || softmax(f(x_i)/T))]
      + (prox_mu / 2) * ||w - w_global||^2

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
same client padded to 400.

Teacher logits for distillation are computed once per round on the client's
examples (the teacher is frozen during local training), not once per step.
"""

from __future__ import annotations

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


def num_local_steps(num_examples: int, *, epochs: int, batch_size: int) -> int:
    """Number of scan steps for a padded client of ``num_examples``."""
    return epochs * math.ceil(num_examples / batch_size)


def tree_sq_norm(tree: Params) -> jax.Array:
    """Squared L2 norm of a pytree."""
    return sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree))


def make_client_update(
    apply_fn: ApplyFn,
    optimizer: optax.GradientTransformation,
    *,
    epochs: int,
    batch_size: int,
    prox_mu: float = 0.0,
    teacher_apply_fn: ApplyFn | None = None,
    kd_weight: float = 0.0,
    temperature: float = 1.0,
) -> ClientUpdateFn:
    """Builds the local training function of one client.

    Args:
      apply_fn: ``apply(params, x) -> logits`` of the model trained locally.
      optimizer: client optimizer (e.g. ``optax.sgd(lr)``); its state is fresh
        every round, as in FedAvg.
      epochs: local epochs ``E >= 1``.
      batch_size: minibatch size ``B >= 1``.
      prox_mu: FedProx proximal weight ``mu >= 0`` (0 = FedAvg).
      teacher_apply_fn: apply function of a frozen teacher; required when
        ``kd_weight > 0``.
      kd_weight: weight of the distillation term.
      temperature: distillation temperature ``T > 0``.

    Returns:
      ``client_update(params, x, y, count, key, teacher_params=None)`` where
      ``x`` is ``[N, ...]``, ``y`` is ``[N]``, ``count`` the number of real
      examples, returning a :class:`~fedjax_kd.types.ClientOutput` with
      ``delta = params - local_params``, ``weight = count`` and metrics
      ``train_loss`` (mean task loss over the examples seen) and
      ``local_steps`` (steps with at least one real example).
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    use_kd = kd_weight > 0
    if use_kd and teacher_apply_fn is None:
        raise ValueError("kd_weight > 0 needs a teacher_apply_fn")

    def batch_loss(params, global_params, xb, yb, tb, valid):
        logits = apply_fn(params, xb)
        task = losses.cross_entropy(logits, yb)
        per_example = task
        if use_kd:
            per_example = task + kd_weight * losses.distillation_loss(logits, tb, temperature)
        loss = losses.masked_mean(per_example, valid)
        if prox_mu > 0:
            diff = jax.tree.map(jnp.subtract, params, global_params)
            loss = loss + 0.5 * prox_mu * tree_sq_norm(diff)
        task_sum = jnp.sum(jnp.where(valid, task, 0.0))
        return loss, task_sum

    grad_fn = jax.grad(batch_loss, has_aux=True)

    def client_update(params, x, y, count, key, teacher_params=None) -> ClientOutput:
        num_examples = x.shape[0]
        steps_per_epoch = math.ceil(num_examples / batch_size)
        padded_len = steps_per_epoch * batch_size
        orders = jax.vmap(lambda e: epoch_order(jax.random.fold_in(key, e), count, num_examples))(
            jnp.arange(epochs)
        )
        orders = jnp.pad(orders, ((0, 0), (0, padded_len - num_examples)))
        batch_idx = orders.reshape(epochs * steps_per_epoch, batch_size)
        slot = jnp.arange(padded_len).reshape(steps_per_epoch, batch_size)
        batch_valid = jnp.tile(slot < count, (epochs, 1))
        teacher_logits = teacher_apply_fn(teacher_params, x) if use_kd else jnp.zeros((0,))

        def step(carry, inputs):
            local, opt_state, loss_sum = carry
            idx, valid = inputs
            tb = teacher_logits[idx] if use_kd else None
            grads, task_sum = grad_fn(local, params, x[idx], y[idx], tb, valid)
            updates, new_opt_state = optimizer.update(grads, opt_state, local)
            new_local = optax.apply_updates(local, updates)
            has_real = jnp.any(valid)
            keep = lambda new, old: jnp.where(has_real, new, old)  # noqa: E731
            local = jax.tree.map(keep, new_local, local)
            opt_state = jax.tree.map(keep, new_opt_state, opt_state)
            return (local, opt_state, loss_sum + task_sum), has_real

        init = (params, optimizer.init(params), jnp.zeros((), jnp.float32))
        (local, _, loss_sum), has_real = jax.lax.scan(step, init, (batch_idx, batch_valid))
        seen = jnp.maximum(count * epochs, 1).astype(jnp.float32)
        delta = jax.tree.map(jnp.subtract, params, local)
        metrics = {
            "train_loss": loss_sum / seen,
            "local_steps": jnp.sum(has_real).astype(jnp.int32),
        }
        return ClientOutput(delta=delta, weight=count.astype(jnp.float32), metrics=metrics)

    return client_update
