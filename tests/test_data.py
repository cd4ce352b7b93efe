"""Tests for fedjax_kd.data: partitioners, client packing, sampling, datasets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from fedjax_kd import data
from fedjax_kd.data import datasets, partition

DIGITS_Y = load_digits(return_X_y=True)[1]
RANDOM_Y = np.random.default_rng(123).integers(0, 7, size=500)

# Arguments that make every partitioner valid on both label sets.
PARTITION_CASES = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.1}),
    ("dirichlet", {"alpha": 1.0, "balance": False}),
    ("shards", {}),
    ("shards", {"shards_per_client": 3}),
    ("quantity", {"sigma": 1.5}),
]


def _partition(name, labels, num_clients, seed, kwargs):
    return partition.PARTITIONERS[name](labels, num_clients, seed=seed, **kwargs)


def _tv_from_global(labels, parts):
    """Mean total-variation distance of client label distributions from the global one."""
    classes = np.unique(labels)
    glob = np.array([np.mean(labels == k) for k in classes])
    tvs = [
        0.5 * np.abs(np.array([np.mean(labels[p] == k) for k in classes]) - glob).sum()
        for p in parts
    ]
    return float(np.mean(tvs))


# ---------------------------------------------------------------- partitioners


@pytest.mark.parametrize("labels", [DIGITS_Y, RANDOM_Y], ids=["digits", "random"])
@pytest.mark.parametrize("num_clients", [1, 7, 50])
@pytest.mark.parametrize("name,kwargs", PARTITION_CASES)
def test_partition_covers_every_index_exactly_once(name, kwargs, num_clients, labels):
    if name == "shards" and num_clients * kwargs.get("shards_per_client", 2) < len(set(labels)):
        # Single-label shards cannot cover more labels than there are shards.
        with pytest.raises(ValueError, match="cannot cover"):
            _partition(name, labels, num_clients, 0, kwargs)
        return
    parts = _partition(name, labels, num_clients, 0, kwargs)
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates within a client
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


@pytest.mark.parametrize("name,kwargs", PARTITION_CASES)
def test_partition_is_deterministic_in_seed(name, kwargs):
    a = _partition(name, DIGITS_Y, 20, 3, kwargs)
    b = _partition(name, DIGITS_Y, 20, 3, kwargs)
    c = _partition(name, DIGITS_Y, 20, 4, kwargs)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in partition.iid(DIGITS_Y, 13, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_skew_grows_as_alpha_shrinks():
    tv = {
        alpha: np.mean(
            [
                _tv_from_global(DIGITS_Y, partition.dirichlet(DIGITS_Y, 20, alpha=alpha, seed=s))
                for s in range(3)
            ]
        )
        for alpha in (0.1, 1.0, 100.0)
    }
    assert tv[0.1] > tv[1.0] > tv[100.0]
    assert tv[0.1] > 0.5  # most of a client's mass sits on few labels
    assert tv[100.0] < 0.15  # near-IID


@pytest.mark.parametrize("min_size", [1, 2, 5])
def test_dirichlet_min_size_holds_for_tiny_alpha(min_size):
    parts = partition.dirichlet(DIGITS_Y, 100, alpha=0.05, seed=0, min_size=min_size)
    assert min(len(p) for p in parts) >= min_size
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(DIGITS_Y)))


def test_dirichlet_top_up_is_only_a_fallback():
    # alpha=100 meets the minimum on the first draw, so max_resamples must not matter.
    a = partition.dirichlet(DIGITS_Y, 10, alpha=100.0, seed=0, max_resamples=1)
    b = partition.dirichlet(DIGITS_Y, 10, alpha=100.0, seed=0, max_resamples=50)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))


def test_dirichlet_top_up_reaches_exact_capacity():
    # min_size * num_clients == num_examples: the only valid result is all clients at min_size.
    labels = np.repeat(np.arange(4), 10)
    parts = partition.dirichlet(labels, 8, alpha=0.05, seed=0, min_size=5, max_resamples=1)
    assert [len(p) for p in parts] == [5] * 8


@pytest.mark.parametrize("labels", [DIGITS_Y, RANDOM_Y], ids=["digits", "random"])
@pytest.mark.parametrize("num_clients,spc", [(5, 2), (10, 2), (100, 2), (30, 1), (40, 3)])
def test_shards_give_at_most_shards_per_client_labels(labels, num_clients, spc):
    parts = partition.shards(labels, num_clients, seed=0, shards_per_client=spc)
    num_labels = [len(np.unique(labels[p])) for p in parts]
    assert max(num_labels) <= spc
    sizes = np.array([len(p) for p in parts])
    # Near-equal shards: sizes stay within a factor 2 of the mean.
    assert sizes.max() <= 2 * sizes.mean() and sizes.min() >= sizes.mean() / 2


def test_shards_match_mcmahan_when_class_sizes_divide():
    # 4 classes x 30 examples, 12 shards of 10: exactly McMahan's equal shards.
    labels = np.repeat(np.arange(4), 30)
    parts = partition.shards(labels, 6, seed=1)
    assert all(len(p) == 20 for p in parts)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_quantity_sizes_vary_more_than_iid():
    def cv(parts):
        sizes = np.array([len(p) for p in parts])
        return sizes.std() / sizes.mean()

    q = partition.quantity(DIGITS_Y, 30, seed=0, sigma=1.0, min_size=4)
    assert cv(q) > 0.5 > 0.05 > cv(partition.iid(DIGITS_Y, 30, seed=0))
    assert min(len(p) for p in q) >= 4
    assert cv(partition.quantity(DIGITS_Y, 30, seed=0, sigma=2.0)) > cv(q)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: partition.iid(DIGITS_Y, 0, seed=0), "num_clients"),
        (lambda: partition.iid(DIGITS_Y[:5], 6, seed=0), "exceeds"),
        (lambda: partition.iid(DIGITS_Y.reshape(-1, 1), 2, seed=0), "1-D"),
        (lambda: partition.iid(DIGITS_Y.astype(float), 2, seed=0), "integers"),
        (lambda: partition.dirichlet(DIGITS_Y, 5, alpha=0.0, seed=0), "alpha"),
        (lambda: partition.dirichlet(DIGITS_Y, 5, alpha=-1.0, seed=0), "alpha"),
        (lambda: partition.dirichlet(DIGITS_Y, 100, alpha=1.0, seed=0, min_size=20), "min_size"),
        (lambda: partition.quantity(DIGITS_Y, 100, seed=0, min_size=20), "min_size"),
        (lambda: partition.quantity(DIGITS_Y, 10, seed=0, sigma=-1.0), "sigma"),
        (lambda: partition.shards(DIGITS_Y, 4, seed=0), "labels"),
        (lambda: partition.shards(DIGITS_Y, 10, seed=0, shards_per_client=0), "shards_per"),
        (lambda: partition.shards(DIGITS_Y[:30], 20, seed=0), "exceed"),
    ],
)
def test_partition_argument_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------ pack


def test_pack_hand_computed():
    x = np.arange(12, dtype=np.float64).reshape(6, 2)  # row i is [2i, 2i + 1]
    y = np.array([5, 4, 3, 2, 1, 0], dtype=np.int64)
    d = data.pack(x, y, [np.array([4, 1]), np.array([], dtype=int), np.array([0, 2, 5])])
    assert d.x.dtype == np.float32 and d.y.dtype == np.int32 and d.count.dtype == np.int32
    np.testing.assert_array_equal(d.count, [2, 0, 3])
    np.testing.assert_array_equal(
        d.x,
        [
            [[8, 9], [2, 3], [0, 0]],
            [[0, 0], [0, 0], [0, 0]],
            [[0, 1], [4, 5], [10, 11]],
        ],
    )
    np.testing.assert_array_equal(d.y, [[1, 4, 0], [0, 0, 0], [5, 3, 0]])
    np.testing.assert_array_equal(
        d.mask(), [[True, True, False], [False, False, False], [True, True, True]]
    )
    assert d.num_clients == 3 and d.max_examples == 3


def test_pack_pad_to():
    x, y = np.ones((4, 3)), np.arange(4)
    d = data.pack(x, y, [[0], [1, 2, 3]], pad_to=5)
    assert d.x.shape == (2, 5, 3) and d.y.shape == (2, 5)
    assert d.x[1, 3:].sum() == 0 and d.x[1, :3].sum() == 9
    with pytest.raises(ValueError, match="pad_to"):
        data.pack(x, y, [[0], [1, 2, 3]], pad_to=2)
    with pytest.raises(ValueError, match="num_examples"):
        data.pack(x, y[:3], [[0]])


def test_pack_matches_python_loop_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4, 3))
    y = rng.integers(0, 10, size=200)
    parts = partition.dirichlet(y, 9, alpha=0.3, seed=0)
    d = data.pack(x, y, parts)
    n = max(len(p) for p in parts)
    assert d.x.shape == (9, n, 4, 3)
    for c, p in enumerate(parts):
        for j in range(n):
            if j < len(p):
                np.testing.assert_array_equal(d.x[c, j], x[p[j]].astype(np.float32))
                assert d.y[c, j] == y[p[j]]
            else:
                assert not d.x[c, j].any() and d.y[c, j] == 0
    # Masked sums equal sums over the unpadded subsets (mask vs slicing).
    sums = np.where(np.asarray(d.mask())[..., None, None], d.x, 0).sum(axis=1)
    np.testing.assert_allclose(sums, [x[p].sum(0) for p in parts], rtol=1e-5)


def test_mask_under_jit_and_vmap():
    d = data.pack(np.ones((6, 1)), np.zeros(6), [[0, 1], [2, 3, 4, 5], [], [0]])
    expected = np.arange(4)[None, :] < np.array([2, 4, 0, 1])[:, None]
    np.testing.assert_array_equal(jax.jit(lambda d: d.mask())(d), expected)
    per_client = jax.vmap(lambda c: c.mask())(jax.tree.map(jnp.asarray, d))
    np.testing.assert_array_equal(per_client, expected)


# ------------------------------------------------------- gather / sample clients


def test_gather_clients_under_jit_equals_numpy_indexing():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 120)
    d = data.pack(rng.normal(size=(120, 3)), y, partition.quantity(y, 12, seed=0))
    ids = np.array([7, 0, 11, 3], dtype=np.int32)
    g = jax.jit(data.gather_clients)(d, jnp.asarray(ids))
    assert isinstance(g, data.ClientData)
    for got, full in zip(g, d, strict=True):
        np.testing.assert_array_equal(got, full[ids])


def test_sample_clients_distinct_in_range_deterministic():
    key = jax.random.key(0)
    ids = data.sample_clients(key, 50, 10)
    assert ids.dtype == jnp.int32 and ids.shape == (10,)
    assert len(set(ids.tolist())) == 10
    assert all(0 <= i < 50 for i in ids.tolist())
    np.testing.assert_array_equal(ids, data.sample_clients(key, 50, 10))
    other = data.sample_clients(jax.random.fold_in(key, 1), 50, 10)
    assert not np.array_equal(ids, other)
    with pytest.raises(ValueError):
        data.sample_clients(key, 5, 6)


def test_sample_clients_roughly_uniform():
    num_clients, k, rounds = 20, 5, 2000
    keys = jax.vmap(functools.partial(jax.random.fold_in, jax.random.key(42)))(jnp.arange(rounds))
    ids = np.asarray(jax.vmap(lambda key: data.sample_clients(key, num_clients, k))(keys))
    assert all(len(set(row)) == k for row in ids)
    counts = np.bincount(ids.ravel(), minlength=num_clients)
    expected = rounds * k / num_clients
    chi2 = ((counts - expected) ** 2 / expected).sum()
    # 19 degrees of freedom: mean 19, P(chi2 > 60) ~ 3e-6. Fixed keys, so no flakes.
    assert chi2 < 60


# -------------------------------------------------------------------- datasets


def test_digits_shapes_range_and_fixed_split():
    a = datasets.digits(num_clients=10, partition="dirichlet", alpha=0.5, seed=0)
    b = datasets.digits(num_clients=10, partition="dirichlet", alpha=0.5, seed=1)
    assert a.name == "digits" and a.num_classes == 10 and a.num_clients == 10
    assert a.feature_shape == (64,)
    assert a.train.x.dtype == np.float32 and a.test_x.dtype == np.float32
    assert a.test_y.dtype == np.int32 and a.train.y.dtype == np.int32
    assert 0.0 <= a.train.x.min() and a.train.x.max() <= 1.0 and a.test_x.max() == 1.0
    assert a.test_x.shape == (360, 64)
    assert int(a.train.count.sum()) == 1797 - 360
    np.testing.assert_array_equal(a.test_x, b.test_x)
    np.testing.assert_array_equal(a.test_y, b.test_y)
    assert not np.array_equal(a.train.count, b.train.count)
    # Stratified: every class is in the test set in (almost) its global proportion.
    np.testing.assert_allclose(np.bincount(a.test_y) / 360, np.bincount(DIGITS_Y) / 1797, atol=0.01)


@pytest.mark.parametrize("name,kwargs", PARTITION_CASES)
def test_digits_every_partition_and_label_counts(name, kwargs):
    ds = datasets.digits(num_clients=12, partition=name, **kwargs)
    counts = ds.label_counts()
    assert counts.shape == (12, 10)
    np.testing.assert_array_equal(counts.sum(1), ds.train.count)
    # Reference: histogram of each client's unpadded labels.
    for c in range(12):
        ref = np.bincount(ds.train.y[c, : ds.train.count[c]], minlength=10)
        np.testing.assert_array_equal(counts[c], ref)
    if name == "shards":
        assert ((counts > 0).sum(1) <= kwargs.get("shards_per_client", 2)).all()


def test_digits_rejects_unknown_partition():
    with pytest.raises(ValueError, match="Unknown partition"):
        datasets.digits(num_clients=3, partition="nope")
    with pytest.raises(TypeError):
        datasets.digits(num_clients=3, partition="dirichlet")  # alpha is required


def test_federated_dataset_validates_dtypes():
    d = data.pack(np.ones((4, 2)), np.zeros(4), [[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="float32"):
        data.FederatedDataset("t", d, np.ones((2, 2)), np.zeros(2, np.int32), 2)
    with pytest.raises(ValueError, match="feature shape"):
        data.FederatedDataset("t", d, np.ones((2, 3), np.float32), np.zeros(2, np.int32), 2)


def _user_rows(arrays, k):
    return slice(arrays.offsets[k], arrays.offsets[k] + arrays.sizes[k])


def test_synthetic_shapes_sizes_and_split():
    ds = datasets.synthetic(alpha=1.0, beta=1.0, num_clients=30, seed=0)
    arrays = datasets._synthetic_arrays(alpha=1.0, beta=1.0, num_users=30, seed=0, iid=False)
    assert ds.name == "synthetic" and ds.num_classes == 10 and ds.feature_shape == (60,)
    assert ds.num_clients == 30
    assert (arrays.sizes >= 50).all()
    # FedProx: train_len = int(0.9 * n_k), the rest is test.
    np.testing.assert_array_equal(ds.train.count, (0.9 * arrays.sizes).astype(int))
    assert len(ds.test_y) == arrays.sizes.sum() - ds.train.count.sum()
    assert (ds.train.count >= 45).all()
    for k in (0, 17, 29):
        rows = arrays.x[_user_rows(arrays, k)]
        np.testing.assert_array_equal(ds.train.x[k, : ds.train.count[k]], rows[: ds.train.count[k]])
    assert set(np.unique(ds.test_y)) <= set(range(10))


def test_synthetic_is_deterministic():
    a = datasets.synthetic(seed=5, num_clients=10)
    b = datasets.synthetic(seed=5, num_clients=10)
    c = datasets.synthetic(seed=6, num_clients=10)
    for u, v in zip(a.train, b.train, strict=True):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(a.test_x, b.test_x)
    assert not np.array_equal(a.train.count, c.train.count)


@pytest.mark.parametrize("iid", [False, True])
def test_synthetic_labels_are_argmax_of_generating_model(iid):
    arrays = datasets._synthetic_arrays(alpha=0.5, beta=0.5, num_users=12, seed=1, iid=iid)
    for k in range(12):
        rows = _user_rows(arrays, k)
        x = arrays.x[rows].astype(np.float64)
        # Plain per-example loop as the reference for the vectorised argmax. The
        # two products round differently (gemv vs gemm): labels are compared
        # exactly because no example's top two logits are within 1e-9.
        logits = [xi @ arrays.w[k] + arrays.b[k] for xi in x]
        top2 = np.sort(np.asarray(logits), axis=1)[:, -2:]
        assert np.all(top2[:, 1] - top2[:, 0] > 1e-9)
        ref = [int(np.argmax(z)) for z in logits]
        np.testing.assert_array_equal(arrays.y[rows], ref)
    if iid:
        assert (arrays.w == arrays.w[0]).all() and (arrays.b == arrays.b[0]).all()
        assert not arrays.mean_x.any()
    else:
        assert not np.allclose(arrays.w[0], arrays.w[1])


def test_synthetic_feature_statistics():
    diag = np.arange(1, 61) ** -1.2
    spread = {}
    for beta in (0.0, 5.0):
        arrays = datasets._synthetic_arrays(alpha=1.0, beta=beta, num_users=40, seed=0, iid=False)
        # Empirical per-user means agree with the generating v_k within 5 standard errors
        # (two formulations: the sampled data and the prior draw).
        for k in range(40):
            rows = arrays.x[_user_rows(arrays, k)]
            se = np.sqrt(diag / len(rows))
            assert (np.abs(rows.mean(0) - arrays.mean_x[k]) < 5 * se + 1e-5).all()
            # Per-feature variance ~ j^-1.2.
            if len(rows) >= 1000:
                np.testing.assert_allclose(rows.var(0), diag, rtol=0.25)
        # v_k ~ N(B_k, 1)^60, so the user-average of v_k has std ~ sqrt(beta^2 + 1/60).
        spread[beta] = arrays.mean_x.mean(1).std()
    assert spread[0.0] < 0.4 < 2.0 < spread[5.0]


def test_synthetic_max_examples_and_test_fraction():
    ds = datasets.synthetic(num_clients=50, seed=0, max_examples=100, test_fraction=0.2)
    assert ds.train.max_examples <= 80
    assert (ds.train.count >= 40).all()
    with pytest.raises(ValueError, match="test_fraction"):
        datasets.synthetic(test_fraction=1.0)


def test_dataset_registry():
    assert set(data.DATASETS) == {"digits", "synthetic"}
    assert set(data.PARTITIONERS) == {"iid", "dirichlet", "shards", "quantity"}
    assert data.DATASETS["synthetic"](num_clients=3, iid=True).num_clients == 3


def test_synthetic_repartition_keeps_the_pooled_training_examples():
    natural = datasets.synthetic(num_clients=12, seed=3)
    skewed = datasets.synthetic(
        num_clients=12, seed=3, partition="dirichlet", partition_kwargs={"alpha": 0.1}
    )
    rows = (
        lambda d: np.sort(  # noqa: E731
            np.concatenate([d.train.x[c, : d.train.count[c], 0] for c in range(12)])
        )
    )
    np.testing.assert_array_equal(rows(natural), rows(skewed))
    np.testing.assert_array_equal(natural.test_x, skewed.test_x)
    assert not np.array_equal(natural.train.count, skewed.train.count)
    with pytest.raises(ValueError, match="partition"):
        datasets.synthetic(num_clients=4, partition="weird")


def test_proxy_holdout_is_disjoint_and_leaves_test_unchanged():
    plain = datasets.digits(num_clients=10, alpha=0.5)
    held = datasets.digits(num_clients=10, alpha=0.5, proxy_fraction=0.1)
    assert held.proxy_x.shape[1:] == (64,)
    n_train = int(plain.train.count.sum())
    assert int(held.train.count.sum()) + len(held.proxy_x) == n_train
    np.testing.assert_array_equal(plain.test_x, held.test_x)
    train_rows = {
        tuple(r) for c in range(10) for r in held.train.x[c, : held.train.count[c]].round(4)
    }
    proxy_rows = {tuple(r) for r in held.proxy_x.round(4)}
    # digits has a few duplicated images; the held-out rows are (almost all) new.
    assert len(proxy_rows - train_rows) >= 0.95 * len(proxy_rows)
    syn = datasets.synthetic(num_clients=6, proxy_fraction=0.2)
    assert syn.proxy_x is not None and len(syn.proxy_x) > 0


@pytest.mark.parametrize("sigma", [50.0, 1000.0])
def test_quantity_with_huge_sigma_still_partitions(sigma):
    labels = np.arange(1000) % 10
    parts = partition.quantity(labels, 20, seed=0, sigma=sigma, min_size=2)
    flat = np.concatenate(parts)
    assert len(flat) == 1000 and len(np.unique(flat)) == 1000
    assert min(len(p) for p in parts) >= 2


def test_pack_refuses_huge_padding():
    x = np.zeros((10, 3), np.float32)
    with pytest.raises(ValueError, match="GiB"):
        data.pack(x, np.zeros(10, np.int32), [np.arange(10)], pad_to=10, max_bytes=100)


def test_synthetic_ragged_layout_holds_the_same_clients():
    padded = datasets.synthetic(num_clients=8, seed=1, layout="padded")
    ragged = datasets.synthetic(num_clients=8, seed=1, layout="ragged")
    assert isinstance(ragged.train, data.RaggedClientData)
    np.testing.assert_array_equal(padded.train.count, ragged.train.count)
    for c in range(8):
        n, o = int(ragged.train.count[c]), int(ragged.train.offsets[c])
        np.testing.assert_array_equal(padded.train.x[c, :n], ragged.train.x[o : o + n])
        np.testing.assert_array_equal(padded.train.y[c, :n], ragged.train.y[o : o + n])
    np.testing.assert_array_equal(padded.label_counts(), ragged.label_counts())
    assert ragged.train.max_examples == padded.train.max_examples


@pytest.mark.parametrize(
    "shape,dtype",
    [((7, 3), np.float32), ((5,), np.int32), ((3, 2, 2), np.uint8)],
)
def test_aligned_arrays_start_on_64_bytes(shape, dtype):
    a = data.federated.aligned_empty(shape, dtype)
    assert a.shape == shape and a.dtype == dtype and a.ctypes.data % 64 == 0
    z = data.federated.aligned_zeros(shape, dtype)
    assert z.ctypes.data % 64 == 0 and not z.any()


def test_pack_ragged_in_place_equals_the_copy_and_needs_increasing_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200_000, 3)).astype(np.float32)  # several blocks of rows
    y = rng.integers(0, 5, 200_000).astype(np.int32)
    parts = [np.arange(0, 70_000), np.arange(70_003, 150_000), np.arange(150_001, 199_990)]
    order = np.concatenate(parts)
    copied = data.pack_ragged(x, y, parts)
    np.testing.assert_array_equal(copied.x, x[order])
    np.testing.assert_array_equal(copied.y, y[order])
    assert copied.x.ctypes.data % 64 == 0
    x2, y2 = x.copy(), y.copy()
    in_place = data.pack_ragged(x2, y2, parts, in_place=True)
    np.testing.assert_array_equal(in_place.x, copied.x)
    np.testing.assert_array_equal(in_place.y, copied.y)
    assert np.shares_memory(in_place.x, x2)  # the population is held once
    np.testing.assert_array_equal(in_place.offsets, copied.offsets)
    # Rows out of order cannot be packed in place: the input stays as it was.
    x3 = x.copy()
    shuffled = [parts[1], parts[0]]
    out = data.pack_ragged(x3, y, shuffled, in_place=True)
    np.testing.assert_array_equal(x3, x)
    np.testing.assert_array_equal(out.x, x[np.concatenate(shuffled)])


def test_to_device_holds_aligned_host_data_once():
    from fedjax_kd import simulate

    host = data.federated.aligned_zeros((1000, 8), np.float32)
    device = simulate.to_device({"x": host})["x"]
    np.testing.assert_array_equal(np.asarray(device), host)
    if jax.default_backend() == "cpu":  # on CPU the device array is the host memory
        host[3, 1] = 7.0
        assert float(device[3, 1]) == 7.0
    assert simulate.to_device({"x": device})["x"] is device


def test_release_rows_after_keeps_the_rows_and_returns_the_rest():
    import os

    def resident_bytes():
        return int(open(f"/proc/{os.getpid()}/statm").read().split()[1]) * os.sysconf("SC_PAGESIZE")

    if not os.path.exists("/proc/self/statm"):
        pytest.skip("reads the resident set from /proc")
    rows = 2_000_000  # 128 MB: large enough for a memory map of its own
    a = data.federated.aligned_empty((rows, 16), np.float32)
    a[:] = np.arange(16, dtype=np.float32)
    before = resident_bytes()
    kept = data.federated.release_rows_after(a, rows // 4)
    assert kept.shape == (rows // 4, 16) and kept.ctypes.data == a.ctypes.data
    np.testing.assert_array_equal(kept[-1], np.arange(16))
    assert before - resident_bytes() > 0.7 * a.nbytes * 3 / 4
    # The pages were freed, not only unmapped (a private mapping): read again, they are zero.
    assert a[-1, 5] == 0.0
    small = data.federated.aligned_empty((10, 2), np.float32)  # no map: only sliced
    assert data.federated.release_rows_after(small, 3).shape == (3, 2)
