"""Small helpers shared by the algorithm tests (importable: tests/ is on sys.path)."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def one_error_line(err: str) -> str:
    """The one ``error: ...`` line of a command's stderr (asserts there is exactly one)."""
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def cohort_of(dataset, ids):
    """The padded ClientData of clients ``ids`` of ``dataset``."""
    return jax.tree.map(lambda a: jnp.asarray(a)[jnp.asarray(ids)], dataset.train)


def client_params(stores, client, num_groups):
    """Client ``client``'s personal params (row ``client // G`` of group ``client % G``)."""
    return stores[client % num_groups].gather(client // num_groups)


def assert_only_sampled_clients_changed(algo, result, *, rounds, k, num_clients, num_groups):
    """Replays the run's cohorts; checks exactly the sampled clients' models moved.

    Returns the set of sampled client ids.
    """
    from fedjax_kd import simulate

    init_key, rounds_key = simulate.seed_keys(0)
    sampled = set()
    for r in range(rounds):
        key_r = jax.random.fold_in(rounds_key, r)
        sample_key = jax.random.fold_in(key_r, simulate.SAMPLE)
        sampled |= set(algo.sample_cohort(sample_key, num_clients, k).tolist())
    initial = jax.jit(algo.init)(init_key)
    for client in range(num_clients):
        same = jax.tree.map(
            lambda a, b: bool(jnp.all(a == b)),
            client_params(result.state.stores, client, num_groups),
            client_params(initial.stores, client, num_groups),
        )
        assert all(jax.tree.leaves(same)) == (client not in sampled), client
    return sampled


#: Smallest distance of an energy fraction from FedKD's threshold at which two
#: float32 formulations of the same update (vmap vs loop, batched vs one SVD, f32
#: vs f64) are sure to pick the same SVD rank: their rounding moves a fraction by
#: about 1e-6. A test that compares SVD-rank bytes exactly asserts this margin
#: first (docs/ARCHITECTURE.md, "Bit-exactness").
RANK_MARGIN = 1e-4


def energy_margin(tree, threshold):
    """Smallest |energy fraction - threshold| over the 2-D leaves' rank choices (float64).

    ``compress.energy_rank`` compares the energy kept by the first ``k`` singular
    values, ``k = 0..r-1``, with ``threshold * total``; this is how close the
    closest of those comparisons is, computed in float64 with NumPy.
    """
    import numpy as np

    margins = [np.inf]
    for leaf in jax.tree.leaves(tree):
        a = np.asarray(leaf, np.float64)
        if a.ndim != 2 or not np.all(np.isfinite(a)) or not np.any(a):
            continue
        s2 = np.square(np.linalg.svd(a, compute_uv=False))
        kept_before = np.concatenate([[0.0], np.cumsum(s2)[:-1]]) / s2.sum()
        margins.append(float(np.min(np.abs(kept_before - float(threshold)))))
    return min(margins)


class FakeModel(NamedTuple):
    """A model stand-in for server-side tests: only ``init`` is used."""

    init: object
    apply: object = None


def feature_client_update(params, x, y, count, key, targets=None, num_epochs=None):
    """A deterministic 'training': ``delta = x[0] + 0.3 w`` (the client's first feature row)."""
    from fedjax_kd.types import ClientOutput

    del y, key, targets, num_epochs
    delta = {"w": x[0] + 0.3 * params["w"]}
    return ClientOutput(delta=delta, weight=count.astype(jnp.float32), metrics={"train_loss": 0.0})


def feature_clients(num_clients: int = 5, dim: int = 12):
    """``num_clients`` clients of 3 feature rows of width ``dim`` (seeded), 1-3 real examples."""
    from fedjax_kd.data import ClientData

    rng = np.random.default_rng(4)
    x = rng.normal(size=(num_clients, 3, dim)).astype(np.float32)
    count = (1 + (np.arange(num_clients) * 7) % 3).astype(np.int32)
    return ClientData(jnp.asarray(x), jnp.zeros((num_clients, 3), jnp.int32), jnp.asarray(count))


#: A 3-feature, 3-class softmax regression (features, classes, padded examples per client)
#: for hand-sized NumPy references of an algorithm's rounds.
SOFTMAX_D, SOFTMAX_C, SOFTMAX_PAD = 3, 3, 5
SOFTMAX_W0 = np.array([[0.2, -0.1, 0.0], [0.05, 0.3, -0.2], [-0.15, 0.1, 0.25]], np.float32)
SOFTMAX_B0 = np.array([0.1, 0.0, -0.1], np.float32)
SOFTMAX = FakeModel(
    init=lambda key: {"w": jnp.asarray(SOFTMAX_W0), "b": jnp.asarray(SOFTMAX_B0)},
    apply=lambda p, x: x @ p["w"] + p["b"],
)


def softmax_clients(counts, seed=0):
    """Clients of ``counts`` real examples (padded to SOFTMAX_PAD) of random features/labels."""
    from fedjax_kd.data import ClientData

    rng = np.random.default_rng(seed)
    n = len(counts)
    x = rng.normal(size=(n, SOFTMAX_PAD, SOFTMAX_D)).astype(np.float32)
    y = rng.integers(0, SOFTMAX_C, size=(n, SOFTMAX_PAD)).astype(np.int32)
    return ClientData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(counts, jnp.int32))


@functools.lru_cache
def _compiled_round(algo, chunk_size):
    from fedjax_kd.data import Cohort

    def run(state, data, ids, key):
        gathered = jax.tree.map(lambda a: a[ids], data)
        return algo.round(state, Cohort.from_data(gathered, ids, chunk_size=chunk_size), key)

    return jax.jit(run)


def jit_round(algo, state, data, ids, key, chunk_size=None):
    """One round of ``algo`` on clients ``ids`` of ``data`` (compiled once per algorithm)."""
    return _compiled_round(algo, chunk_size)(state, data, jnp.asarray(ids, jnp.int32), key)


def softmax_grad(w, b, x, y):
    """Mean softmax cross-entropy gradient over a batch (float64): ``(d w, d b)``."""
    logits = x @ w + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return x.T @ p / len(y), p.mean(axis=0)
