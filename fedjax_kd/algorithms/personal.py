"""Shared pieces of the personal-model family: FedMD, DS-FL and FD.

These algorithms exchange no parameters: every client keeps its own model
across rounds in a per-group store (client ``i`` is row ``i // G`` of group
``i % G``'s store), trains it on private data, and talks to the server through
outputs on a shared public set (FedMD, DS-FL) or per-label statistics (FD).
This module holds the store, grouping, training and accounting helpers they
share; each algorithm's own equations stay in its file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from fedjax_kd import cohort, losses
from fedjax_kd.client import local_train
from fedjax_kd.cohort import group_sampler  # noqa: F401 - re-exported for the family
from fedjax_kd.compress import tree_bytes
from fedjax_kd.types import ApplyFn, Params

# Named random streams of a round (fold_in constants on the round's client key).
SUBSET, PHASE_A, PHASE_B, SERVER = 0, 1, 2, 3


def init_personal_stores(models: Sequence, key: jax.Array, num_clients: int) -> tuple:
    """One personal-model store per group, client ``i`` initialised with ``fold_in(key, i)``.

    Client ``i`` is row ``i // G`` of group ``i % G``'s store. Keying the
    initialisation by client id makes a client's initial model independent of
    the number of groups.
    """
    num_groups = len(models)
    stores = []
    sizes = cohort.group_sizes(num_clients, num_groups)
    for g, (model, n) in enumerate(zip(models, sizes, strict=True)):
        ids = g + num_groups * jnp.arange(n)
        # lax.map, not vmap: the same values, and XLA on CPU compiles the vmapped
        # threefry of the initialisers several times slower (init runs once).
        stores.append(jax.lax.map(lambda i, m=model: m.init(jax.random.fold_in(key, i)), ids))
    return tuple(stores)


def require(server_data: dict | None, name: str, algorithm: str) -> jax.Array:
    """``server_data[name]`` or a ValueError that says what is missing."""
    if not server_data or name not in server_data:
        hint = {
            "proxy_x": "a public/proxy set (build the dataset with proxy_fraction > 0)",
            "cohort_ids": "the sampled client ids (simulate.run passes them)",
        }[name]
        raise ValueError(f"{algorithm} needs server_data[{name!r}]: {hint}")
    return server_data[name]


def group_rows(ids: jax.Array, num_groups: int) -> list[tuple[slice, jax.Array]]:
    """Per group: the cohort rows (a slice) and the rows of the group's store.

    The cohort must be ordered by group with ``K / G`` clients each, as
    :func:`fedjax_kd.cohort.sample_by_group` returns it; client ``i`` is row
    ``i // G`` of group ``i % G``'s store.
    """
    k = ids.shape[0]
    if k % num_groups:
        raise ValueError(f"a cohort of {k} clients cannot be split into {num_groups} groups")
    per = k // num_groups
    return [
        (slice(g * per, (g + 1) * per), ids[g * per : (g + 1) * per] // num_groups)
        for g in range(num_groups)
    ]


def personal_eval_models(models: Sequence, stores: tuple) -> dict[str, tuple[ApplyFn, Params]]:
    """``eval_models`` entries for every client's personal model.

    The headline ``clients`` returns logits ``[num_clients, B, C]`` (the groups
    concatenated), so the evaluation averages over all clients' models; with
    several groups, ``group{g}_{name}`` averages over one group's clients.
    """

    def stacked(model):
        return jax.vmap(model.apply, in_axes=(0, None))

    def apply_all(all_stores, x):
        return jnp.concatenate(
            [stacked(m)(s, x) for m, s in zip(models, all_stores, strict=True)], axis=0
        )

    entries = {"clients": (apply_all, stores)}
    if len(models) > 1:
        for g, m in enumerate(models):
            entries[f"group{g}_{getattr(m, 'name', g)}"] = (stacked(m), stores[g])
    return entries


def public_subset(key: jax.Array, proxy_x: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """``size`` distinct public examples drawn with ``key``: ``(int32 indices [P], x [P, ...])``."""
    num = proxy_x.shape[0]
    if not 1 <= size <= num:
        raise ValueError(f"public_size={size} must be in [1, {num}] (the size of the proxy set)")
    idx = jax.random.choice(key, num, (size,), replace=False).astype(jnp.int32)
    return idx, proxy_x[idx]


def cross_entropy_loss(apply_fn: ApplyFn) -> Callable:
    """``local_train`` loss: mean cross-entropy on ``batch["x"], batch["y"]``."""

    def loss_fn(params, batch, valid):
        per_example = losses.cross_entropy(apply_fn(params, batch["x"]), batch["y"])
        return losses.masked_mean(per_example, valid), jnp.sum(jnp.where(valid, per_example, 0.0))

    return loss_fn


def target_loss(apply_fn: ApplyFn, per_example: Callable) -> Callable:
    """``local_train`` loss: mean ``per_example(f(batch["x"]), batch["targets"])``."""

    def loss_fn(params, batch, valid):
        values = per_example(apply_fn(params, batch["x"]), batch["targets"])
        return losses.masked_mean(values, valid), jnp.sum(jnp.where(valid, values, 0.0))

    return loss_fn


def make_private_train(apply_fn, optimizer, *, epochs: int, batch_size: int) -> Callable:
    """Vmapped ``(params [k], x [k, N], y [k, N], count [k], keys [k]) -> (params, metrics)``."""

    def one(params, x, y, count, key):
        return local_train(
            cross_entropy_loss(apply_fn),
            params,
            optimizer,
            {"x": x, "y": y},
            count,
            key,
            epochs=epochs,
            batch_size=batch_size,
        )

    return jax.vmap(one)


def make_shared_target_train(
    apply_fn, per_example: Callable, optimizer, *, epochs: int, batch_size: int
) -> Callable:
    """Vmapped ``(params [k], x [P], targets [P, C], keys [k]) -> (params, metrics)``.

    Every client trains on the same public inputs and targets (the consensus).
    """

    def one(params, x, targets, key):
        return local_train(
            target_loss(apply_fn, per_example),
            params,
            optimizer,
            {"x": x, "targets": targets},
            jnp.asarray(x.shape[0], jnp.int32),
            key,
            epochs=epochs,
            batch_size=batch_size,
        )

    return jax.vmap(one, in_axes=(0, None, None, 0))


def stacked_outputs(models: Sequence, params: Sequence, x: jax.Array) -> jax.Array:
    """Logits ``[K, P, C]`` of the cohort's models (groups in cohort order) on shared ``x``."""
    return jnp.concatenate(
        [jax.vmap(m.apply, in_axes=(0, None))(p, x) for m, p in zip(models, params, strict=True)]
    )


def per_client_bytes(message, k: int) -> jax.Array:
    """int32 ``[k]``: each client sends or receives ``message`` (one client's arrays)."""
    return jnp.full((k,), tree_bytes(message), jnp.int32)
