"""Small helpers shared by the algorithm tests (importable: tests/ is on sys.path)."""

import jax
import jax.numpy as jnp


def cohort_of(dataset, ids):
    """The padded ClientData of clients ``ids`` of ``dataset``."""
    return jax.tree.map(lambda a: jnp.asarray(a)[jnp.asarray(ids)], dataset.train)


def client_params(stores, client, num_groups):
    """Client ``client``'s personal params (row ``client // G`` of group ``client % G``)."""
    return jax.tree.map(lambda a: a[client // num_groups], stores[client % num_groups])
