"""Bounded-memory rounds: chunks, ragged stores, per-round caps, device sharding."""

import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_kd import algorithms, data, models, simulate
from fedjax_kd import cohort as cohort_lib
from fedjax_kd.data import FederatedDataset, RaggedClientData

COMMON = dict(
    client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), epochs=1, batch_size=8
)


def to_ragged(dataset: FederatedDataset) -> FederatedDataset:
    """The same clients stored back to back (the layout of heavy-tailed datasets)."""
    t = dataset.train
    parts, offset = [], 0
    xs, ys = [], []
    for c in range(t.num_clients):
        n = int(t.count[c])
        xs.append(t.x[c, :n])
        ys.append(t.y[c, :n])
        parts.append(np.arange(offset, offset + n))
        offset += n
    store = data.pack_ragged(np.concatenate(xs), np.concatenate(ys), parts)
    return FederatedDataset(
        dataset.name, store, dataset.test_x, dataset.test_y, dataset.num_classes, dataset.proxy_x
    )


def run(algo, dataset, clients_per_round=7, **kwargs):
    return simulate.run(
        algo, dataset, rounds=3, clients_per_round=clients_per_round, eval_every=3, seed=0,
        progress=False, **kwargs,
    )  # fmt: skip


def test_gather_cohort_hand_computed_window_and_cap():
    store = data.pack_ragged(
        np.arange(9, dtype=np.float32)[:, None], np.arange(9), [[0, 1], [2, 3, 4, 5, 6], [7, 8]]
    )
    assert isinstance(store, RaggedClientData)
    out = data.gather_cohort(jax.tree.map(jnp.asarray, store), jnp.array([2, 0]), 3)
    np.testing.assert_array_equal(out.x[..., 0], [[7, 8, 0], [0, 1, 0]])
    np.testing.assert_array_equal(out.count, [2, 2])
    # Client 1 has 5 > cap 3 examples: a window of 3 consecutive ones, counted as 3.
    starts = set()
    for seed in range(20):
        w = data.gather_cohort(
            jax.tree.map(jnp.asarray, store), jnp.array([1]), 3, jax.random.key(seed)
        )
        xs = np.asarray(w.x[0, :, 0])
        assert int(w.count[0]) == 3 and np.all(np.diff(xs) == 1) and 2 <= xs[0] <= 4
        starts.add(int(xs[0]))
    assert starts == {2, 3, 4}


def test_client_store_scatter_writes_valid_rows_only_hand_computed():
    """Padding rows (valid False) write nowhere, even when they repeat a real row's id."""
    store = cohort_lib.ClientStore({"w": jnp.arange(5.0), "b": jnp.zeros((5, 2))})
    rows = {"w": jnp.array([10.0, 20.0, 30.0]), "b": jnp.ones((3, 2))}
    out = store.scatter(jnp.array([3, 1, 3]), rows, jnp.array([True, True, False])).rows
    np.testing.assert_array_equal(out["w"], [0.0, 20.0, 2.0, 10.0, 4.0])
    np.testing.assert_array_equal(out["b"][:, 0], [0.0, 1.0, 0.0, 1.0, 0.0])
    new = {"w": jnp.array([7.0, 8.0]), "b": 2 * jnp.ones((2, 2))}
    plain = store.scatter(jnp.array([4, 0]), new).rows  # no mask: every row writes
    np.testing.assert_array_equal(plain["w"], [8.0, 1.0, 2.0, 3.0, 7.0])
    np.testing.assert_array_equal(store.gather(jnp.array([4, 1]))["w"], [4.0, 1.0])
    assert store.size == 5


def test_client_store_rows_are_keyed_by_client_id():
    """Row r holds init(fold_in(key, ids[r])): a client's state does not depend on the layout."""
    key = jax.random.key(3)
    store = cohort_lib.ClientStore.create(
        lambda k: {"u": jax.random.uniform(k, (2,))}, key, jnp.array([5, 2, 9])
    )
    for r, cid in enumerate([5, 2, 9]):
        expected = jax.random.uniform(jax.random.fold_in(key, cid), (2,))
        np.testing.assert_array_equal(store.rows["u"][r], expected)


def test_ragged_store_gives_bit_identical_runs(digits_small):
    model = models.create("mlp-8", feature_shape=(64,), num_classes=10)
    algo = algorithms.fed_avg(model, **COMMON)
    padded = run(algo, digits_small)
    ragged = run(algo, to_ragged(digits_small))
    chex.assert_trees_all_equal(padded.state.params, ragged.state.params)
    assert padded.history[-1]["test_accuracy"] == ragged.history[-1]["test_accuracy"]


@pytest.mark.parametrize("name", ["fedavg", "teacher_student", "feddf", "fedkd"])
def test_chunked_equals_unchunked(digits_proxy, name):
    student = models.create("mlp-8", feature_shape=(64,), num_classes=10)
    teacher = models.create("mlp-16", feature_shape=(64,), num_classes=10)
    algo = {
        "fedavg": lambda: algorithms.fed_avg(student, **COMMON),
        "teacher_student": lambda: algorithms.teacher_student(
            student, teacher, distill_steps=3, distill_batch_size=32, **COMMON
        ),
        "feddf": lambda: algorithms.fed_df(
            [student], distill_steps=3, distill_batch_size=32, **COMMON
        ),
        # Dense updates: SVD ranks chosen at a threshold could flip on float rounding.
        "fedkd": lambda: algorithms.fed_kd(
            student,
            teacher,
            num_clients=digits_proxy.num_clients,
            compress=False,
            **COMMON,
        ),
    }[name]()
    whole = run(algo, digits_proxy)
    chunked = run(
        algo, digits_proxy, client_chunk_size=3
    )  # 7 clients: chunks 3 + 3 + 1(+2 dummies)
    chex.assert_trees_all_close(whole.state, chunked.state, rtol=1e-5, atol=1e-6)
    for a, b in zip(whole.history, chunked.history, strict=True):
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)
        assert a["uplink_bytes"] == b["uplink_bytes"]


PERSONAL = dict(client_optimizer=optax.sgd(0.1), epochs=1, batch_size=8)


@pytest.mark.parametrize(
    "name, groups",
    [("fedmd", 2), ("dsfl", 1), ("dsfl_first", 2), ("fd", 2)],
)
def test_personal_chunked_equals_unchunked(digits_proxy, name, groups):
    """FedMD, DS-FL, FD in chunks (FedMD, DS-FL: uploads, then training) == the whole cohort.

    One group: 7 clients in chunks 3 + 3 + 1(+2 dummies). Two groups (mlp-8,
    mlp-16): 8 clients, 4 per group, in chunks 3 + 1(+2 dummies) per group.
    Dummies repeat a real client: they must not count in the consensus nor
    write to its store row (FedMD's and DS-FL's dummies digest / distil the
    public set, so the store comparison fails if they write).
    """
    ms = [models.create(f"mlp-{w}", feature_shape=(64,), num_classes=10) for w in (8, 16)]
    ms = ms[:groups]
    n = digits_proxy.num_clients
    public = dict(public_size=40, num_clients=n, **PERSONAL)
    algo = {
        "fedmd": lambda: algorithms.fed_md(ms, digest_batch_size=16, **public),
        "dsfl": lambda: algorithms.ds_fl(ms, distill_batch_size=16, **public),
        "dsfl_first": lambda: algorithms.ds_fl(
            ms, distill_batch_size=16, distill_first=True, server_model=ms[0], **public
        ),
        "fd": lambda: algorithms.fd(ms, num_clients=n, num_classes=10, **PERSONAL),
    }[name]()
    k = 7 if groups == 1 else 8
    whole = run(algo, digits_proxy, clients_per_round=k)
    chunked = run(algo, digits_proxy, clients_per_round=k, client_chunk_size=3)
    chex.assert_trees_all_close(whole.state, chunked.state, rtol=1e-5, atol=1e-6)
    for a, b in zip(whole.history, chunked.history, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key.endswith("bytes"):
                assert a[key] == b[key], key
            elif key.endswith(("loss", "accuracy", "entropy")):
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)


def test_cap_bounds_local_work_and_keeps_small_clients_exact(digits_small):
    model = models.create("mlp-8", feature_shape=(64,), num_classes=10)
    algo = algorithms.fed_avg(model, **COMMON)
    largest = int(digits_small.train.count.max())
    exact = run(algo, digits_small)
    same = run(algo, digits_small, max_local_examples=largest)
    chex.assert_trees_all_equal(exact.state.params, same.state.params)
    capped = run(algo, digits_small, max_local_examples=8)
    assert not np.allclose(
        capped.state.params["head"]["kernel"], exact.state.params["head"]["kernel"]
    )


SHARDED = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np, optax
    from fedjax_kd import algorithms, data, models, simulate
    assert len(jax.devices()) == 4, jax.devices()
    ds = data.digits(num_clients=20, partition="dirichlet", alpha=0.5, seed=0, proxy_fraction=0.1)
    student = models.create("mlp-8", feature_shape=(64,), num_classes=10)
    teacher = models.create("mlp-16", feature_shape=(64,), num_classes=10)
    common = dict(client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0),
                  epochs=1, batch_size=8)
    out = {}
    for name, algo in [
        ("fedavg", algorithms.fed_avg(student, **common)),
        ("teacher_student", algorithms.teacher_student(student, teacher, distill_steps=2,
                                                       distill_batch_size=32, **common)),
    ]:
        for mesh, chunk in ((None, None), ("auto", None), ("auto", 4)):
            r = simulate.run(algo, ds, rounds=2, clients_per_round=6, eval_every=2, seed=0,
                             progress=False, mesh=mesh, client_chunk_size=chunk)
            leaves = [np.asarray(l).ravel().tolist() for l in jax.tree.leaves(r.state.params)]
            out[f"{name}/{mesh}/{chunk}"] = leaves
    json.dump(out, sys.stdout)
    """
)


def test_sharded_over_four_devices_matches_single_device(tmp_path):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    for name in ("fedavg", "teacher_student"):
        reference = out[f"{name}/None/None"]
        for key in (f"{name}/auto/None", f"{name}/auto/4"):
            for a, b in zip(reference, out[key], strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
