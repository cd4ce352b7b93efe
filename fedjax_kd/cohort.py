"""Cohort helpers: per-client state stores and architecture groups.

Some algorithms keep state on every client across rounds (FedKD's private
mentors, FedMD/FD/DS-FL's personal models). That state lives in a *store*: a
pytree whose leaves have a leading ``[num_clients]`` axis; a round gathers the
cohort's rows, trains them under ``vmap``, and scatters them back. Clients
outside the cohort are untouched.

Heterogeneous-model algorithms give client ``i`` the architecture of group
``i % num_groups``; :func:`sample_by_group` draws the same number of clients
from every group each round so that each group's sub-cohort has a static shape
(one compiled round per group layout).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedjax_kd.types import PyTree


def init_store(init_fn, key: jax.Array, num_clients: int) -> PyTree:
    """``[num_clients, ...]`` store with ``init_fn(fold_in(key, i))`` in row ``i``."""
    ids = jnp.arange(num_clients)
    # lax.map, not vmap: the same values, and XLA on CPU compiles a vmapped
    # threefry initialiser several times slower (init runs once per run).
    return jax.lax.map(lambda i: init_fn(jax.random.fold_in(key, i)), ids)


def gather(store: PyTree, ids: jax.Array) -> PyTree:
    """Rows ``ids`` of every leaf of ``store``."""
    return jax.tree.map(lambda a: jnp.take(a, ids, axis=0), store)


def scatter(store: PyTree, ids: jax.Array, rows: PyTree, valid: jax.Array | None = None) -> PyTree:
    """``store`` with rows ``ids`` replaced by ``rows`` (ids must be distinct).

    With ``valid`` (bool, one per id), the rows where it is False write
    nowhere: the padding rows of a chunk, which may repeat a real client's id.
    """
    if valid is not None:
        ids = jnp.where(valid, ids, jax.tree.leaves(store)[0].shape[0])  # out of range
    return jax.tree.map(lambda a, r: a.at[ids].set(r, mode="drop"), store, rows)


def group_sizes(num_clients: int, num_groups: int) -> list[int]:
    """Number of clients in each group (client ``i`` is in group ``i % num_groups``)."""
    return [math.ceil((num_clients - g) / num_groups) for g in range(num_groups)]


def group_sampler(num_groups: int):
    """``sample_cohort`` drawing ``K / G`` clients per group (None for one group)."""
    if num_groups == 1:
        return None
    return lambda key, n, k: sample_by_group(key, n, k, num_groups)


def sample_by_group(key: jax.Array, num_clients: int, k: int, num_groups: int) -> jax.Array:
    """``k`` distinct ids, ``k / num_groups`` drawn uniformly from each group.

    Returns int32 ``[k]`` ordered by group: positions ``[g * k_g, (g + 1) * k_g)``
    hold group ``g``'s clients, ``k_g = k // num_groups``.

    Raises:
      ValueError: if ``k`` is not a multiple of ``num_groups`` or a group has
        fewer than ``k_g`` clients.
    """
    if k % num_groups:
        raise ValueError(f"clients_per_round ({k}) must be a multiple of the {num_groups} groups")
    per_group = k // num_groups
    sizes = group_sizes(num_clients, num_groups)
    if min(sizes) < per_group:
        raise ValueError(
            f"each of the {num_groups} groups needs >= {per_group} clients; smallest has "
            f"{min(sizes)}"
        )
    parts = []
    for g, n in enumerate(sizes):
        local = jax.random.choice(jax.random.fold_in(key, g), n, (per_group,), replace=False)
        parts.append(g + num_groups * local)
    return jnp.concatenate(parts).astype(jnp.int32)
