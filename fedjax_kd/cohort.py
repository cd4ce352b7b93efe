"""Cohort helpers: the per-client state store and architecture groups.

Some algorithms keep state on every client across rounds (FedKD's private
mentors, FedMD/FD/DS-FL's personal models). That state lives in a
:class:`ClientStore`: a pytree whose leaves have a leading row axis; a round
gathers the cohort's rows, trains them under ``vmap``, and scatters them back.
Clients outside the cohort are untouched.

Heterogeneous-model algorithms give client ``i`` the architecture of group
``i % num_groups``; :func:`sample_by_group` draws the same number of clients
from every group each round so that each group's sub-cohort has a static shape
(one compiled round per group layout).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_kd.types import PyTree


class ClientStore(NamedTuple):
    """State kept on clients across rounds: one row per client, every leaf ``[n, ...]``.

    The one per-client store of the library: FedKD's private mentors (row =
    client id) and the personal models of FedMD, DS-FL and FD (one store per
    architecture group; client ``i`` is row ``i // G`` of group ``i % G``'s).
    A round gathers its cohort's rows, trains them under ``vmap`` and
    scatters them back; rows of clients outside the cohort are untouched. A
    pytree (a ``NamedTuple``), so it sits in an algorithm's state and is
    checkpointed with it.

    Attributes:
      rows: pytree whose leaves have a leading ``[n]`` row axis.
    """

    rows: PyTree

    @classmethod
    def create(cls, init_fn, key: jax.Array, client_ids: jax.Array) -> ClientStore:
        """Row ``r`` holds ``init_fn(fold_in(key, client_ids[r]))``.

        Keying each row by its client's id makes a client's initial state
        independent of how the clients are laid out in stores.
        """
        # lax.map, not vmap: the same values, and XLA on CPU compiles a vmapped
        # threefry initialiser several times slower (init runs once per run).
        return cls(jax.lax.map(lambda i: init_fn(jax.random.fold_in(key, i)), client_ids))

    @classmethod
    def zeros(cls, like: PyTree, num_rows: int) -> ClientStore:
        """``num_rows`` rows of zeros shaped like ``like`` (control variates, residuals)."""
        return cls(jax.tree.map(lambda a: jnp.zeros((num_rows, *a.shape), a.dtype), like))

    @property
    def size(self) -> int:
        """Number of rows ``n``."""
        return jax.tree.leaves(self.rows)[0].shape[0]

    def gather(self, rows: jax.Array) -> PyTree:
        """The state in rows ``rows`` (leaves ``[len(rows), ...]``)."""
        return jax.tree.map(lambda a: jnp.take(a, rows, axis=0), self.rows)

    def scatter(self, rows: jax.Array, values: PyTree, valid: jax.Array | None = None):
        """The store with rows ``rows`` (distinct) replaced by ``values``.

        With ``valid`` (bool, one per row), the rows where it is False write
        nowhere: the padding rows of a chunk, which may repeat a real client's.
        """
        if valid is not None:
            rows = jnp.where(valid, rows, self.size)  # out of range: dropped
        return ClientStore(
            jax.tree.map(lambda a, r: a.at[rows].set(r, mode="drop"), self.rows, values)
        )


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
