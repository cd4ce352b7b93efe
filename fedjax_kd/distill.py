"""Server-side distillation: ensemble teachers and distillation on a proxy set.

FedDF (Lin et al., "Ensemble Distillation for Robust Model Fusion in Federated
Learning", NeurIPS 2020, arXiv 2006.07242) distils the ensemble of the
cohort's client models into a server model on unlabeled proxy data. The
ensemble teacher is ``softmax(mean_k z_k / T)`` over the clients' logits
``z_k`` ("AVGLOGITS"); the loss is ``T^2 KL(teacher || softmax(z_s / T))``
averaged over the batch (``batchmean``). FedDF's defaults are T = 1, Adam with
lr 1e-3, batch 128 and gradient-norm clipping at 5 (the optimizer is an
argument here). FedDF stops early on a labeled validation set; we run a fixed
number of steps instead (a documented deviation: no server labels needed).

The ensemble logits on the whole proxy set are computed once per round (the
clients' models are fixed during distillation), not once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_kd import losses
from fedjax_kd.types import ApplyFn, Params


def _stacked_logits(apply_fn: ApplyFn, stacked_params: Params, x: jax.Array) -> jax.Array:
    """Logits ``[K, P, C]`` of K models (params with a leading axis) on ``x``."""
    return jax.vmap(apply_fn, in_axes=(0, None))(stacked_params, x)


def ensemble_logits(
    members: Sequence[tuple[ApplyFn, Params]], x: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """Mean logits ``[P, C]`` of an ensemble of (possibly heterogeneous) stacked models.

    Args:
      members: ``(apply_fn, stacked_params)`` per architecture group; each
        contributes ``[K_g, P, C]`` logits.
      x: ``[P, ...]`` inputs.
      weights: optional ``[sum K_g]`` weights (e.g. zero for empty clients);
        default uniform.

    Returns:
      ``sum_k w_k z_k / sum_k w_k``.
    """
    logits = jnp.concatenate([_stacked_logits(a, p, x) for a, p in members], axis=0)
    if weights is None:
        return jnp.mean(logits, axis=0)
    w = weights.astype(logits.dtype)
    return jnp.tensordot(w, logits, axes=1) / jnp.maximum(jnp.sum(w), 1e-12)


def make_server_distill(
    apply_fn: ApplyFn,
    optimizer: optax.GradientTransformation,
    *,
    steps: int,
    batch_size: int,
    temperature: float = 1.0,
) -> Callable:
    """Builds ``distill(params, proxy_x, target_logits, key) -> (params, metrics)``.

    Runs ``steps`` optimizer steps (a ``lax.scan``); step ``i`` draws a batch of
    ``min(batch_size, P)`` distinct proxy examples with ``fold_in(key, i)`` and
    minimises ``mean_batch T^2 KL(softmax(target/T) || softmax(f(x)/T))``.
    With ``steps == 0`` it returns ``params`` unchanged.

    Metrics: ``distill_loss`` (mean over steps; 0 when no steps).
    """

    def loss_fn(params, xb, tb):
        return jnp.mean(losses.distillation_loss(apply_fn(params, xb), tb, temperature))

    grad_fn = jax.value_and_grad(loss_fn)

    def distill(params, proxy_x, target_logits, key):
        if steps == 0:
            return params, {"distill_loss": jnp.zeros((), jnp.float32)}
        num_proxy = proxy_x.shape[0]
        b = min(batch_size, num_proxy)

        def step(carry, i):
            p, opt_state = carry
            idx = jax.random.choice(jax.random.fold_in(key, i), num_proxy, (b,), replace=False)
            loss, grads = grad_fn(p, proxy_x[idx], target_logits[idx])
            updates, opt_state = optimizer.update(grads, opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), loss

        (params, _), step_losses = jax.lax.scan(
            step, (params, optimizer.init(params)), jnp.arange(steps)
        )
        return params, {"distill_loss": jnp.mean(step_losses)}

    return distill
