"""Aggregation of client outputs and the server's optimizer step.

FedAvg (McMahan et al., AISTATS 2017, arXiv 1602.05629) averages client
updates weighted by their number of examples; adaptive federated optimization
(Reddi et al., ICLR 2021, arXiv 2003.00295) feeds that average, the
pseudo-gradient ``delta = global - mean(client)``, to a server optimizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_kd.types import Params, PyTree


def weighted_mean(stacked: PyTree, weights: jax.Array) -> PyTree:
    """``sum_k w_k x_k / sum_k w_k`` over the leading (client) axis of every leaf.

    Args:
      stacked: pytree whose leaves are ``[K, ...]``.
      weights: ``[K]`` non-negative weights (e.g. example counts); if they sum
        to 0 the result is 0.

    Returns:
      Pytree of the leaves' weighted means (client axis removed).
    """
    weights = weights.astype(jnp.float32)
    total = jnp.maximum(jnp.sum(weights), jnp.finfo(jnp.float32).tiny)
    return jax.tree.map(lambda x: jnp.tensordot(weights, x, axes=1) / total, stacked)


def client_weights(counts: jax.Array, *, uniform: bool = False) -> jax.Array:
    """Aggregation weights: example counts (FedAvg), or 1 per non-empty client."""
    counts = counts.astype(jnp.float32)
    return (counts > 0).astype(jnp.float32) if uniform else counts


def tree_all_finite(tree: PyTree) -> jax.Array:
    """True iff every element of every leaf is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def server_update(
    params: Params,
    opt_state: optax.OptState,
    delta: Params,
    optimizer: optax.GradientTransformation,
) -> tuple[Params, optax.OptState]:
    """Applies the server optimizer to the pseudo-gradient ``delta``.

    With ``optax.sgd(1.0)`` this sets ``params`` to the clients' weighted mean.
    """
    updates, opt_state = optimizer.update(delta, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
