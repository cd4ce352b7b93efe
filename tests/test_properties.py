"""Properties over random partitioner arguments and random whole configs (issue 15, item 5).

Every search is repeatable: ``derandomize=True``, or (where one test function runs
once per algorithm or per mistake, which ``derandomize`` would give one shared
stream) a fixed ``@seed`` per case and no example database. What is drawn:

* Partitioners (:mod:`fedjax_kd.data.partition`), called directly: label vectors of
  0-300 examples (int8/int32/int64/uint8, 1-12 classes, gaps and negative values,
  one class, one example), any partitioner, ``num_clients`` from 1 to the number of
  examples (and beyond, 0, negative, non-integers), Dirichlet ``alpha`` from 5e-324 to
  1e300 (and 0, negative, nan, inf), ``shards_per_client``, ``min_size``,
  ``balance``, ``max_resamples``, lognormal ``sigma`` (0 to 1e300, and negative,
  nan, inf), any uint32 seed. Valid arguments must give a true partition (every
  index exactly once, as many sorted int64 parts as clients asked), deterministic in
  the seed, with the partitioner's own promise (iid sizes within 1, shards' label
  bound, the minimum size, Dirichlet's IID limit), and iid/quantity equal to a
  plain NumPy recomputation of their documented recipe; invalid ones one ValueError
  line that names the argument (never an IndexError, TypeError, OverflowError...).
* The data-building layer the config uses (``experiment.resolve`` then
  ``experiment.build_checked_dataset``): digits, synthetic and a small mnist1d with
  random ``data.*`` partition keys, degenerate ones included (more clients than
  examples, tiny/huge alpha, proxy fractions near 0 and 1, 10-sample mnist1d) and
  now and then one out-of-range value: a dataset with the asked clients, every
  training example once (clients' plus proxy) and the partitioner's promise, or one
  ConfigError line.
* Whole runs through the CLI's own entry, ``fedjax_kd.cli.main(["run", ...])``: for
  every listed algorithm, one small VALID config by construction (dataset digits,
  synthetic or mnist1d; any partitioner with arguments it can meet; 1-2 rounds; 1-6
  clients per round of 2-12; linear/MLP (and 1-D CNN on mnist1d) students, teachers
  and model groups where the algorithm takes them; client optimizer, lr, epochs,
  batch size, example cap, chunking, rounds per call, evaluation cadence and batch;
  the algorithm's own hyperparameters; a proxy fraction (and public-set sizes that
  fit it) where it distils on one; stragglers, dropped or partial, where it supports
  them; for the FedAvg family one of a robust aggregator (with or without an
  attack), DP-FedAvg, quantization or dropping non-finite updates; a server
  optimizer). Each must exit 0 and write finite metrics (compilation costs seconds,
  so one config per algorithm, and not the all-simplest draw Hypothesis starts with).
  And INVALID configs: for each of 60 mistakes (an option its algorithm refuses, a
  value out of range, a partition the data cannot meet, a missing or too small proxy
  set, a model that cannot take the data, conflicting options), two valid configs of
  the algorithms it applies to with that mistake: exit 2, one ``error:`` line naming
  the cause, nothing on stdout, no simulation started.
* What ``fedjax-kd list`` says each algorithm supports (stragglers, groups, a teacher,
  robust aggregation, attacks, DP and its variants, uplink codecs, DP on published
  outputs) passes validation.
* DP-FedAvg's accounting over every ``dp.noise_multiplier >= 0``: ``privacy.epsilon``
  never crashes and is monotone in the noise and the rounds; a ``dp.epsilon_budget``
  run reaches the simulation or is one error line, and with the PLD accountant does
  so in seconds (a SIGALRM time limit turns a hang into a failure).
"""

import contextlib
import io
import json
import math
import signal
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, event, example, given, seed, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedjax_kd import algorithms, cli, experiment, privacy, simulate
from fedjax_kd.data import partition as part

PARTITIONERS = sorted(part.PARTITIONERS)

#: Exceptions that mean the package crashed instead of refusing the input.
CRASHES = (IndexError, LookupError, ArithmeticError, TypeError, AttributeError, AssertionError)

FAST = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------- partitioners


@st.composite
def label_vectors(draw, min_size=0):
    """Integer label vectors: 0-300 examples, 1-12 classes, odd dtypes, gaps, negatives."""
    dtype = draw(st.sampled_from([np.int64, np.int32, np.int8, np.uint8]))
    lo = 0 if dtype == np.uint8 else draw(st.sampled_from([0, 0, 0, -5]))
    num_classes = draw(st.integers(1, 12))
    values = draw(
        st.lists(st.integers(lo, lo + 30), min_size=num_classes, max_size=num_classes).map(
            lambda v: sorted(set(v))
        )
    )
    n = draw(st.integers(min_size, 300) | st.sampled_from([min_size, min_size + 1]))
    labels = draw(hnp.arrays(dtype, n, elements=st.sampled_from(values)))
    return labels


def _partition_args(draw, name, labels, num_clients):
    """Valid keyword arguments of partitioner ``name`` for ``labels`` over ``num_clients``."""
    n = len(labels)
    kwargs = {"seed": draw(st.integers(0, 2**32 - 1))}
    if name in ("dirichlet", "quantity"):
        kwargs["min_size"] = draw(st.integers(0, n // num_clients))
    if name == "dirichlet":
        kwargs["alpha"] = draw(
            st.floats(1e-3, 1e3) | st.sampled_from([5e-324, 1e-300, 1e-8, 1e6, 1e12, 1e300])
        )
        kwargs["balance"] = draw(st.booleans())
        kwargs["max_resamples"] = draw(st.integers(1, 5))
    elif name == "shards":
        classes = len(np.unique(labels))
        low = -(-classes // num_clients)  # ceil: enough shards for every label
        high = n // num_clients
        kwargs["shards_per_client"] = draw(st.integers(low, min(high, low + 5)))
    elif name == "quantity":
        kwargs["sigma"] = draw(st.floats(0, 4) | st.sampled_from([0.0, 1e-9, 50.0, 1e300]))
    return kwargs


@st.composite
def valid_partitions(draw):
    """``(name, labels, num_clients, kwargs)`` that the partitioner's docstring allows."""
    name = draw(st.sampled_from(PARTITIONERS))
    labels = draw(label_vectors(min_size=1))
    n = len(labels)
    num_clients = draw(st.integers(1, n) | st.sampled_from([1, n]))
    if name == "shards":  # the most clients that still give every label a shard
        classes = len(np.unique(labels))
        while -(-classes // num_clients) > n // num_clients:
            num_clients -= 1
    return name, labels, num_clients, _partition_args(draw, name, labels, num_clients)


def assert_true_partition(parts, n: int, num_clients: int) -> None:
    """``parts`` are ``num_clients`` sorted int64 arrays holding each of ``range(n)`` once."""
    assert isinstance(parts, list) and len(parts) == num_clients
    for p in parts:
        assert isinstance(p, np.ndarray) and p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0), "a part is unsorted or repeats an index"
    everything = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    assert len(everything) == n, f"{len(everything)} indices for {n} examples"
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))


def numpy_iid(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """iid's documented recipe in plain NumPy: a seeded permutation cut into near-equal parts."""
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def numpy_quantity_sizes(n: int, num_clients: int, seed: int, sigma: float, min_size: int):
    """quantity's documented client sizes: ``min_size`` + largest-remainder lognormal shares."""
    z = np.random.default_rng(seed).normal(0.0, sigma, num_clients)
    w = np.exp(z - z.max())  # lognormal(0, sigma) up to a common factor
    rest = n - min_size * num_clients
    quota = w / w.sum() * rest
    sizes = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - sizes), kind="stable")
    sizes[order[: rest - sizes.sum()]] += 1
    return min_size + sizes


def check_promises(name, labels, num_clients, kwargs, parts) -> None:
    """The partitioner's own promise beyond being a partition (its docstring)."""
    sizes = np.array([len(p) for p in parts])
    n = len(labels)
    if name == "iid":
        assert sizes.max() - sizes.min() <= 1
        for got, want in zip(parts, numpy_iid(n, num_clients, kwargs["seed"]), strict=True):
            np.testing.assert_array_equal(got, want)
    elif name == "quantity":
        want = numpy_quantity_sizes(
            n, num_clients, kwargs["seed"], kwargs["sigma"], kwargs["min_size"]
        )
        np.testing.assert_array_equal(sizes, want)
    elif name == "shards":
        spc = kwargs["shards_per_client"]
        per_client = [len(np.unique(labels[p])) for p in parts]
        assert max(per_client) <= spc, (per_client, spc)
        # Every shard holds one label: the (client, label) pairs are at most the shards.
        assert sum(per_client) <= num_clients * spc
        assert min(sizes) >= 1  # every client holds spc >= 1 non-empty shards
    elif name == "dirichlet":
        assert sizes.min() >= kwargs["min_size"], (sizes.min(), kwargs["min_size"])
        if kwargs["alpha"] >= 1e6 and not kwargs["balance"] and kwargs["min_size"] == 0:
            # The IID limit: each client gets ~n_k / C of every class k.
            for k in np.unique(labels):
                counts = np.array([np.sum(labels[p] == k) for p in parts])
                share = np.sum(labels == k) / num_clients
                assert np.all(np.abs(counts - share) <= 2), (k, counts, share)


@FAST
@given(valid_partitions())
def test_valid_arguments_give_a_true_deterministic_partition(case):
    name, labels, num_clients, kwargs = case
    before = labels.copy()
    parts = part.PARTITIONERS[name](labels, num_clients, **kwargs)
    np.testing.assert_array_equal(labels, before)  # never written to
    assert_true_partition(parts, len(labels), num_clients)
    check_promises(name, labels, num_clients, kwargs, parts)
    again = part.PARTITIONERS[name](labels.copy(), num_clients, **kwargs)
    for a, b in zip(parts, again, strict=True):
        np.testing.assert_array_equal(a, b)
    if name in ("iid", "quantity"):  # only the length is used
        zeros = part.PARTITIONERS[name](np.zeros(len(labels), np.int32), num_clients, **kwargs)
        for a, b in zip(parts, zeros, strict=True):
            np.testing.assert_array_equal(a, b)


def assert_one_value_error(call, match: str | None = None) -> str:
    """``call()`` raises a ValueError (not a crash type) with a one-line message; returns it."""
    with pytest.raises(ValueError) as info:
        call()
    e = info.value
    assert not isinstance(e, CRASHES), f"{type(e).__name__}: {e}"
    message = str(e)
    assert message and "\n" not in message, repr(message)
    if match is not None:
        assert match in message, (match, message)
    return message


@st.composite
def invalid_partitions(draw):
    """``(name, labels, num_clients, kwargs, word)``: one documented rule broken; ``word``
    is what the message must name."""
    name = draw(st.sampled_from(PARTITIONERS))
    labels = draw(label_vectors(min_size=1))
    n = len(labels)
    num_clients = draw(st.integers(1, n))
    if name == "shards":
        classes = len(np.unique(labels))
        while -(-classes // num_clients) > n // num_clients:
            num_clients -= 1
    kwargs = _partition_args(draw, name, labels, num_clients)
    rules = ["num_clients", "labels"]
    if name in ("dirichlet", "quantity"):
        rules += ["min_size", "min_size_total"]
    if name == "dirichlet":
        rules += ["alpha", "max_resamples"]
    if name == "shards":
        rules += ["shards_per_client", "too_many_shards"]
        if len(np.unique(labels)) > 1:
            rules.append("too_few_shards")
    if name == "quantity":
        rules.append("sigma")
    rule = draw(st.sampled_from(rules))
    word = rule
    if rule == "num_clients":
        num_clients = draw(st.sampled_from([0, -1, -(2**40), n + 1, n + 1000, 2.5, 0.5]))
    elif rule == "labels":
        labels = draw(
            st.sampled_from(
                [
                    labels.astype(np.float64),
                    labels.astype(bool),
                    np.stack([labels, labels], axis=1),
                    labels.astype(str),
                ]
            )
        )
        word = "labels"
    elif rule == "min_size":
        kwargs["min_size"] = draw(st.integers(-(2**40), -1))
    elif rule == "min_size_total":
        kwargs["min_size"] = n // num_clients + 1 + draw(st.integers(0, 1000))
        word = "min_size"
    elif rule == "alpha":
        kwargs["alpha"] = draw(st.sampled_from([0.0, -0.0, -1.0, -1e-300, float("nan")]))
    elif rule == "max_resamples":
        kwargs["max_resamples"] = draw(st.integers(-5, 0))
    elif rule == "shards_per_client":
        kwargs["shards_per_client"] = draw(st.integers(-(2**40), 0))
    elif rule == "too_many_shards":
        kwargs["shards_per_client"] = n // num_clients + 1 + draw(st.integers(0, 50))
        word = "shards"
    elif rule == "too_few_shards":
        classes = len(np.unique(labels))
        num_clients = draw(st.integers(1, classes - 1))
        kwargs["shards_per_client"] = draw(st.integers(1, max(1, (classes - 1) // num_clients)))
        word = "shards"
    elif rule == "sigma":
        kwargs["sigma"] = draw(st.sampled_from([-1.0, -1e-300, -1e300, float("nan")]))
    return name, labels, num_clients, kwargs, word


@FAST
@given(invalid_partitions())
def test_invalid_arguments_are_one_value_error(case):
    name, labels, num_clients, kwargs, word = case
    assert_one_value_error(
        lambda: part.PARTITIONERS[name](labels, num_clients, **kwargs), match=word
    )


#: The count arguments of the partitioners, as ``(partitioner, argument)``.
COUNTS = [(name, "num_clients") for name in PARTITIONERS] + [
    ("shards", "shards_per_client"),
    ("dirichlet", "max_resamples"),
]

#: Twelve examples of three labels: a case every partitioner can split over 3 clients.
TWELVE = np.arange(12) % 3


@settings(FAST, max_examples=60)
@given(
    st.sampled_from(COUNTS),
    label_vectors(min_size=12),
    st.sampled_from([3.0, 2.5, 0.5, float("inf"), float("nan"), np.float64(3.0)]),
)
# What the search found (the package's bugs, kept as the first cases tried):
@example(("dirichlet", "num_clients"), TWELVE, 3.0)  # TypeError from range()
@example(("quantity", "num_clients"), TWELVE, 3.0)  # TypeError from np.split
@example(("shards", "num_clients"), TWELVE, 3.0)  # numpy AxisError (an IndexError)
@example(("iid", "num_clients"), TWELVE, float("inf"))  # OverflowError from int()
@example(("shards", "shards_per_client"), TWELVE, 2.5)  # numpy AxisError
@example(("dirichlet", "max_resamples"), TWELVE, 2.5)  # TypeError from range()
def test_non_integer_counts_are_one_value_error_or_act_as_integers(count, labels, value):
    """A count given as a float: refused in one ValueError line, or (integral) taken as the int.

    ``partition._check`` accepts ``num_clients=3.0`` on purpose (``int(c) == c``), so
    such a call must give the same partition as ``3``.
    """
    name, key = count
    if name == "shards":  # three labels: 3 clients x 1-2 shards cover them
        labels = (labels % 3).astype(labels.dtype)
    kwargs = {"seed": 0, **({"alpha": 0.5, "min_size": 0} if name == "dirichlet" else {})}
    num_clients = value if key == "num_clients" else 3
    if key != "num_clients":
        kwargs[key] = value
    try:
        parts = part.PARTITIONERS[name](labels, num_clients, **kwargs)
    except ValueError as e:
        assert not isinstance(e, CRASHES), f"{name}({key}={value!r}): {type(e).__name__}: {e}"
        assert "\n" not in str(e)
        return
    except Exception as e:  # noqa: BLE001 - the property is that nothing else escapes
        pytest.fail(f"{name}({key}={value!r}) raised {type(e).__name__}: {e}")
    assert float(value).is_integer(), f"{name} accepted {key}={value!r}"
    as_int = {**kwargs, **({} if key == "num_clients" else {key: int(value)})}
    want = part.PARTITIONERS[name](labels, int(num_clients), **as_int)
    assert_true_partition(parts, len(labels), len(want))
    for a, b in zip(parts, want, strict=True):
        np.testing.assert_array_equal(a, b)


@settings(FAST, max_examples=30)
@given(
    st.sampled_from(["dirichlet", "quantity"]),
    label_vectors(min_size=8),
    st.integers(1, 8),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
@example("dirichlet", np.zeros(8, np.int64), 2, 0, False)  # not near-IID: sizes [0, 8]
@example("quantity", np.zeros(8, np.int64), 4, 0, False)  # 12 indices for 8 examples
def test_infinite_alpha_or_sigma_is_refused_or_still_a_partition(name, labels, c, rng, balance):
    """``alpha=inf``/``sigma=inf`` pass the ``> 0``/``>= 0`` checks: they must still give a
    true partition (alpha=inf: the IID limit, like alpha=1e300) or one ValueError line."""
    num_clients = min(c, len(labels))
    if name == "dirichlet":
        kwargs = dict(alpha=float("inf"), seed=rng, min_size=0, balance=balance)
    else:
        kwargs = dict(sigma=float("inf"), seed=rng, min_size=1)
    try:
        with np.errstate(all="ignore"):
            parts = part.PARTITIONERS[name](labels, num_clients, **kwargs)
    except ValueError as e:
        assert "\n" not in str(e) and not isinstance(e, CRASHES)
        return
    assert_true_partition(parts, len(labels), num_clients)
    sizes = [len(p) for p in parts]
    if name == "quantity":
        assert min(sizes) >= kwargs["min_size"], sizes
    elif not balance:
        check_promises(name, labels, num_clients, kwargs, parts)


# ---------------------------------------------------------------- the data layer of a config

#: The datasets that are generated or shipped with a wheel (no files to read).
NO_FILES = ("digits", "synthetic", "mnist1d")


def as_text(value) -> str:
    """``value`` as a ``--config.KEY=VALUE`` string (floats exactly, booleans lowercase)."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def one_line_config_error(call):
    """``call()``'s value, or None when it raises a ConfigError, whose message must be one
    non-empty line; any other exception propagates (and fails the test)."""
    try:
        return call()
    except experiment.ConfigError as e:
        message = str(e)
        assert message and "\n" not in message, repr(message)
        return None


#: Out-of-range values of the data keys (resolve must refuse each in one line).
BAD_DATA_VALUES = [
    ("data.num_clients", 0),
    ("data.num_clients", -1),
    ("data.alpha", 0.0),
    ("data.alpha", -1.0),
    ("data.alpha", float("nan")),
    ("data.alpha", float("inf")),
    ("data.min_client_size", 0),
    ("data.min_client_size", 2**31),
    ("data.shards_per_client", 0),
    ("data.quantity_sigma", -1.0),
    ("data.proxy_fraction", 1.0),
    ("data.proxy_fraction", -0.1),
    ("data.partition", "natural"),
    ("digits.test_fraction", 0.0),
    ("mnist1d.num_samples", 9),
    ("synthetic.max_examples", 1),
    ("synthetic.test_fraction", 1.0),
]


@st.composite
def data_overrides(draw):
    """``--config.KEY=VALUE`` pairs of the data keys: any no-file dataset and partition,
    in-range values the data may not meet (more clients than examples, tiny and huge
    alpha, proxy fractions near 0 and 1), and now and then one out-of-range value."""
    name = draw(st.sampled_from(NO_FILES))
    o = {"data.name": name, "seed": draw(st.integers(0, 2**32 - 1)), "clients_per_round": 1}
    o["data.partition"] = draw(st.sampled_from(PARTITIONERS))
    big = 200 if name == "synthetic" else 10**6  # synthetic draws every user

    def mostly(usual, *odd):
        """``usual`` three times in four, else one of the ``odd`` (degenerate) values."""
        if draw(st.integers(0, 3)):
            return draw(usual)
        return draw(st.sampled_from(odd))

    o["data.num_clients"] = mostly(st.integers(1, 40), 1, 2, 700, big)
    o["data.alpha"] = mostly(st.floats(1e-3, 1e3), 5e-324, 1e-300, 1e300)
    o["data.min_client_size"] = mostly(st.integers(1, 5), 100)
    o["data.shards_per_client"] = mostly(st.integers(1, 8), 500)
    o["data.quantity_sigma"] = mostly(st.floats(0, 4), 1e300)
    o["data.proxy_fraction"] = mostly(st.sampled_from([0.0, 0.0, 0.05, 0.3]), 1e-9, 0.9, 0.9999)
    if name == "digits":
        o["digits.test_fraction"] = draw(st.sampled_from([0.2, 0.01, 0.5, 0.99]))
    elif name == "mnist1d":
        o["mnist1d.num_samples"] = mostly(st.integers(100, 300), 10, 11, 20)
    else:
        o["synthetic.partition"] = draw(st.sampled_from(["natural", *PARTITIONERS]))
        o["synthetic.max_examples"] = mostly(st.integers(10, 50), 2, 3)
        o["synthetic.test_fraction"] = draw(st.sampled_from([0.1, 0.5, 0.9]))
        o["synthetic.iid"] = draw(st.booleans())
    bad = mostly(st.none(), *BAD_DATA_VALUES)
    if bad is not None:
        o[bad[0]] = bad[1]
    return [(k, as_text(v)) for k, v in o.items()]


def pool_size(config) -> int:
    """The training examples (clients' plus proxy) that ``config``'s dataset splits, in NumPy."""
    name = config.data.name
    if name == "digits":  # sklearn's train_test_split keeps n - ceil(f * n) for training
        return 1797 - math.ceil(config.digits.test_fraction * 1797)
    if name == "mnist1d":
        return int(10 * (config.mnist1d.num_samples // 10) * 0.8)
    # synthetic: every user has exactly max_examples (<= 50 < its 50 + lognormal draws)
    s = config.synthetic
    per_user = int(np.floor((1.0 - s.test_fraction) * np.int64(s.max_examples)))
    return config.data.num_clients * per_user


@settings(FAST, max_examples=80)
@given(data_overrides())
def test_the_data_keys_give_the_asked_partition_or_one_config_error(overrides):
    config = one_line_config_error(lambda: experiment.resolve(None, overrides))
    if config is None:
        event("refused by resolve")
        return
    d = config.data
    dataset = one_line_config_error(lambda: experiment.build_checked_dataset(config))
    if dataset is None:
        event(f"{d.name}: refused by the data layer")
        return
    event(f"{d.name}: built")
    count = np.asarray(dataset.train.count)
    assert dataset.num_clients == d.num_clients == len(count)
    proxy = 0 if dataset.proxy_x is None else len(dataset.proxy_x)
    assert (proxy > 0) == (d.proxy_fraction > 0)
    assert int(count.sum()) + proxy == pool_size(config)
    partition = config.synthetic.partition if d.name == "synthetic" else d.partition
    if partition == "iid":
        assert count.max() - count.min() <= 1
    elif partition in ("dirichlet", "quantity"):
        assert count.min() >= d.min_client_size
    elif partition == "shards":
        y = np.asarray(dataset.train.y)
        labels = [len(np.unique(y[c, : count[c]])) for c in range(len(count))]
        assert max(labels) <= d.shards_per_client and min(count) >= 1
    else:  # synthetic's natural partition: user k keeps its own training part
        assert len(set(count.tolist())) == 1


# ---------------------------------------------------------------- whole runs through the CLI

SPECS = algorithms.SPECS
ALGORITHMS = sorted(SPECS)
#: Algorithms that distil on a server proxy set (once server distillation is on).
WITH_PROXY = sorted(
    name
    for name, spec in SPECS.items()
    if spec.needs_proxy(experiment.resolve(None, [("server.distill_steps", "1")]))
)
AGGREGATORS = ["median", "trimmed_mean", "norm_bound", "centered_clip", "krum", "multi_krum"]
ATTACKS = ["sign_flip", "scale", "noise", "label_flip", "alie", "ipm"]

#: Each example compiles a run (seconds), so one per algorithm, and no shrinking (each
#: step would compile again; the failure message holds the whole config). Not
#: ``derandomize`` (which would draw the same stream for every algorithm's copy of the
#: inner test) but a fixed seed per algorithm and no example database: as repeatable.
RUNS = settings(
    max_examples=1,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def proxy_and_client_pool(o: dict) -> tuple[int, int]:
    """The proxy set's and the clients' training examples ``o``'s dataset will hold (NumPy)."""
    p = o.get("data.proxy_fraction", 0.0)
    if o["data.name"] == "synthetic":  # capped users of exactly max_examples (<= 50) examples
        per_user = int(np.floor((1.0 - 0.1) * np.int64(o["synthetic.max_examples"])))
        proxy_per_user = int(np.floor(p * per_user))
        c = o["data.num_clients"]
        return c * proxy_per_user, c * (per_user - proxy_per_user)
    if o["data.name"] == "digits":
        pool = 1797 - math.ceil(0.2 * 1797)
    else:
        pool = int(10 * (o["mnist1d.num_samples"] // 10) * 0.8)
    proxy = math.ceil(p * pool) if p else 0  # sklearn's train_test_split: ceil(f * n)
    return proxy, pool - proxy


def draw_dp(draw, *clip_keys: str) -> dict:
    """DP settings: a clip norm for each of ``clip_keys``, noise, an epsilon budget or none."""
    o = {key: draw(st.floats(0.1, 10)) for key in clip_keys}
    if o:
        o["dp.noise_multiplier"] = draw(st.floats(0, 2))
        o["dp.epsilon_budget"] = draw(st.sampled_from([0.0, 1e9]))
    return o


@st.composite
def valid_runs(draw, algo: str) -> dict:
    """A small config that ``algo`` must run: ``{key: value}`` (see the module docstring)."""
    spec = SPECS[algo]
    o = {"algorithm.name": algo, "seed": draw(st.integers(0, 2**32 - 1))}
    o["rounds"] = draw(st.integers(1, 2))
    o["eval_every"] = draw(st.integers(1, 2))
    groups = 2 if spec.groups and draw(st.booleans()) else 1
    k = groups * draw(st.integers(1, 6 // groups))
    o["clients_per_round"] = k
    c = o["data.num_clients"] = draw(st.integers(max(k, 2), 12))
    name = o["data.name"] = draw(st.sampled_from(NO_FILES))
    if name == "synthetic":
        o["synthetic.max_examples"] = draw(st.integers(10, 40))
        o["synthetic.iid"] = draw(st.booleans())
    elif name == "mnist1d":
        o["mnist1d.num_samples"] = draw(st.integers(100, 300))
    if algo in WITH_PROXY:
        o["data.proxy_fraction"] = draw(st.sampled_from([0.15, 0.2, 0.3]))
    proxy, pool = proxy_and_client_pool(o)
    partition = draw(st.sampled_from(["natural"] * (name == "synthetic") + PARTITIONERS))
    o["synthetic.partition" if name == "synthetic" else "data.partition"] = partition
    if partition in ("dirichlet", "quantity"):
        o["data.min_client_size"] = draw(st.integers(1, min(3, pool // c)))
    if partition == "dirichlet":
        o["data.alpha"] = draw(st.floats(0.05, 100) | st.sampled_from([1e-4, 1e4]))
    elif partition == "quantity":
        o["data.quantity_sigma"] = draw(st.floats(0, 2))
    elif partition == "shards":  # enough single-label shards for 10 labels, not too many
        spc = -(-10 // c) + draw(st.integers(0, 1))
        if c * spc > pool:
            spc = -(-10 // c)
        o["data.shards_per_client"] = spc

    features = ["linear", "mlp-2", "mlp-4", "mlp-8"] + ["cnn1d-4"] * (name == "mnist1d")
    o["model.student"] = draw(st.sampled_from(features))
    if spec.teacher:
        o["model.teacher"] = draw(st.sampled_from(features))
    if groups > 1:
        o["model.student_groups"] = ",".join(draw(st.permutations(features))[:groups])
    epochs = o["client.epochs"] = draw(st.integers(1, 2))
    o["client.optimizer"] = draw(st.sampled_from(["sgd", "momentum", "adam"]))
    o["client.lr"] = draw(st.floats(0.01, 0.3))
    o["client.batch_size"] = draw(st.integers(1, 16))
    o["client.max_examples"] = draw(st.integers(4, 32))
    o["client_chunk_size"] = draw(st.integers(0, k))
    o["rounds_per_call"] = draw(st.integers(1, 2))
    o["algorithm.uniform_weighting"] = draw(st.booleans())
    o["eval_batch_size"] = draw(st.sampled_from([7, 64, 1024]))
    o["server.optimizer"] = draw(st.sampled_from(["sgd", "avgm", "adam", "yogi", "adagrad"]))
    o["server.lr"] = draw(st.floats(0.05, 1.0))

    if spec.stragglers:
        fraction = draw(st.sampled_from([0.0, 0.0, 0.5, 1.0]))
        drop = draw(st.booleans()) or epochs < 2  # partial work needs 2+ epochs
        if drop and round(fraction * k) >= k:  # would drop the whole cohort
            drop, fraction = epochs < 2, (0.0 if epochs < 2 else fraction)
        o["client.straggler_fraction"], o["client.drop_stragglers"] = fraction, drop
    if algo in ("teacher_student", "feddf"):
        o["server.distill_steps"] = draw(st.integers(0, 3))
        o["server.distill_batch_size"] = draw(st.integers(1, 16))
        o["server.distill_temperature"] = draw(st.floats(0.5, 4))
    if spec.robust:
        option = draw(st.sampled_from(["none", "aggregator", "attack", "dp", "codec", "drop"]))
        if option in ("aggregator", "attack"):
            rules = AGGREGATORS if k >= 3 else AGGREGATORS[:4]
            aggregator = draw(st.sampled_from(["mean", *rules]))
            o["server.aggregator"] = aggregator
            o["server.trim_beta"] = draw(st.floats(0, 0.49))
            o["server.norm_bound"] = draw(st.floats(0.1, 10))
            o["server.clip_tau"] = draw(st.floats(0.1, 10))
            o["server.clip_iters"] = draw(st.integers(1, 3))
            if aggregator in ("krum", "multi_krum"):
                o["server.krum_f"] = draw(st.integers(0, (k - 3) // 2))
                o["server.multi_krum_m"] = draw(st.integers(0, k))
        if option == "attack" and k >= 2:
            kind = draw(st.sampled_from(ATTACKS if k >= 3 else ATTACKS[:-2] + ["ipm"]))
            attackers = draw(st.integers(1, (k - 1) // 2 if kind == "alie" else k - 1))
            o["attack.kind"], o["attack.fraction"] = kind, attackers / k
        elif option == "dp":
            o.update(draw_dp(draw, "dp.clip_norm"))
            if draw(st.booleans()):  # Poisson cohorts (no stragglers: those need fixed ones)
                o["dp.sampling"] = "poisson"
                o["dp.accountant"] = draw(st.sampled_from(["rdp", "pld"]))
                o["client.straggler_fraction"] = 0.0
                if o["dp.accountant"] == "pld":  # a PLD budget hangs: its own test below
                    o["dp.epsilon_budget"] = 0.0
            if draw(st.booleans()):
                o["dp.adaptive"] = True
                o["dp.target_quantile"] = draw(st.floats(0.1, 0.9))
                o["dp.clip_learning_rate"] = draw(st.floats(0.05, 0.5))
        elif option == "codec":
            codec, values = draw(
                st.sampled_from(
                    [
                        ("client.quantize_bits", st.integers(1, 16)),
                        ("client.topk_fraction", st.floats(0.05, 1)),
                        ("client.svd_energy", st.floats(0.05, 1)),
                    ]
                )
            )
            o[codec] = draw(values)
            o["client.error_feedback"] = draw(st.booleans())
        elif option == "drop":
            o["server.drop_nonfinite"] = True
    elif (spec.private_updates or spec.private_outputs) and groups == 1 and draw(st.booleans()):
        # DP for the distillers (not with architecture groups, which sample apart):
        # DP-FedAvg on the updates and/or DP on what the clients publish (fedjax-kd list).
        publishes = spec.private_outputs and (
            algo not in ("teacher_student", "feddf") or o["server.distill_steps"] > 0
        )
        keys = ["dp.clip_norm"] * spec.private_updates + ["dp.output_clip_norm"] * publishes
        o.update(draw_dp(draw, *keys))
    if algo in ("fedmd", "dsfl"):
        public = o[f"{algo}.public_size"] = draw(st.integers(1, min(16, proxy)))
        o[f"{algo}.public_batch_size"] = draw(st.integers(1, public))
        o[f"{algo}.public_epochs"] = draw(st.integers(1, 2))
    if algo == "dsfl":
        o["dsfl.temperature"] = draw(st.floats(0.05, 1))
        o["dsfl.aggregation"] = draw(st.sampled_from(["era", "mean"]))
    hypers = {
        "fedprox": {"mu": st.floats(0, 1)},
        "fedntd": {"beta": st.floats(0, 2), "temperature": st.floats(0.5, 3)},
        "teacher_student": {
            "kd_weight": st.floats(0, 2),
            "temperature": st.floats(0.5, 3),
            "kd_start_round": st.integers(0, 2),
        },
        "fedkd": {
            "energy_start": st.floats(0.5, 1),
            "energy_end": st.floats(0.5, 1),
            "energy_rounds": st.integers(0, 3),
            "compress": st.booleans(),
            "stop_gradient_denominator": st.booleans(),
        },
        "fd": {"gamma": st.floats(0, 2)},
    }
    for key, values in hypers.get(algo, {}).items():
        o[f"{algo}.{key}"] = draw(values)
    return o


def run_cli(o: dict, workdir: str | None = None) -> tuple[int, str, str]:
    """``fedjax-kd run`` on ``o``'s ``--config.KEY=VALUE`` pairs, in-process.

    Returns ``(exit code, stdout, stderr)``; an exception escaping ``cli.main`` (what a
    user would see as a traceback) propagates and fails the test.
    """
    argv = ["run", "--no-progress", *[f"--config.{k}={as_text(v)}" for k, v in o.items()]]
    if workdir is not None:
        argv += ["--workdir", workdir]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def non_finite_keys(record: dict) -> list[str]:
    """The keys of ``record`` whose numbers (or lists of numbers) are not finite."""
    bad = []
    for key, value in record.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, int | float) and not isinstance(v, bool) and not math.isfinite(v):
                bad.append(key)
    return bad


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_a_valid_config_runs_and_writes_finite_metrics(algo):
    @RUNS
    @seed(zlib.crc32(algo.encode()))
    @given(valid_runs(algo))
    def runs(o):
        """Runs ``o`` in a fresh workdir and reads back what it wrote."""
        # Hypothesis first tries the all-simplest draw, the same tiny config for every
        # algorithm (the default-run tests' ground); skip it for a random one.
        assume(o["seed"] != 0)
        with tempfile.TemporaryDirectory() as workdir, time_limit(120):  # a hang fails
            code, out, err = run_cli(o, workdir)
            assert code == 0, (o, err)
            assert "Traceback" not in err and "error:" not in err, err
            summary = json.loads((Path(workdir) / "summary.json").read_text())
            lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert records and records[-1]["round"] == summary["rounds"] == o["rounds"], (
            records,
            summary,
        )
        for record in [*records, summary]:
            assert not non_finite_keys(record), (non_finite_keys(record), record)
        assert 0.0 <= summary["test_accuracy"] <= 1.0
        if o.get("dp.clip_norm"):  # DP's epsilon: null without noise, else positive
            assert all(r["dp_epsilon"] is None or r["dp_epsilon"] > 0 for r in records), records
        assert json.loads(out.splitlines()[1]) == summary  # the line the command prints

    runs()


def _partition_key(o: dict) -> str:
    """The key that picks ``o``'s partitioner (synthetic has its own, with ``natural``)."""
    return "synthetic.partition" if o["data.name"] == "synthetic" else "data.partition"


def _every(spec) -> bool:
    """Every algorithm can make this mistake."""
    return True


#: ``what: (which algorithms (spec -> bool), the change (config -> overrides), a fragment
#: the error line must hold)``: one mistake each, on top of a valid config.
MISTAKES = {
    "no rounds": (_every, lambda o: {"rounds": 0}, "'rounds' must be >= 1"),
    "rounds past int32": (_every, lambda o: {"rounds": 2**31}, "'rounds' must be an int32"),
    "negative seed": (_every, lambda o: {"seed": -1}, "'seed' must be in [0, 2**32)"),
    "seed past uint32": (_every, lambda o: {"seed": 2**32}, "'seed' must be in [0, 2**32)"),
    "cohort above the population": (
        _every,
        lambda o: {"clients_per_round": o["data.num_clients"] + 1},
        "'clients_per_round' must be <=",
    ),
    "no cohort": (_every, lambda o: {"clients_per_round": 0}, "'clients_per_round' must be"),
    "eval_every 0": (_every, lambda o: {"eval_every": 0}, "'eval_every'"),
    "eval batch 0": (_every, lambda o: {"eval_batch_size": 0}, "'eval_batch_size'"),
    "negative chunk": (_every, lambda o: {"client_chunk_size": -1}, "'client_chunk_size'"),
    "rounds_per_call 0": (_every, lambda o: {"rounds_per_call": 0}, "'rounds_per_call'"),
    "lr 0": (_every, lambda o: {"client.lr": 0.0}, "'client.lr' must be > 0"),
    "lr inf": (_every, lambda o: {"client.lr": float("inf")}, "'client.lr' must be a finite"),
    "momentum 1": (_every, lambda o: {"client.momentum": 1.0}, "'client.momentum'"),
    "no epochs": (_every, lambda o: {"client.epochs": 0}, "'client.epochs' must be >= 1"),
    "batch 0": (_every, lambda o: {"client.batch_size": 0}, "'client.batch_size'"),
    "straggler fraction 1.5": (
        _every,
        lambda o: {"client.straggler_fraction": 1.5},
        "'client.straggler_fraction' must be in [0, 1]",
    ),
    "proxy fraction 1": (_every, lambda o: {"data.proxy_fraction": 1.0}, "'data.proxy_fraction'"),
    "server lr nan": (_every, lambda o: {"server.lr": float("nan")}, "'server.lr'"),
    "b2 = 1": (_every, lambda o: {"server.b2": 1.0}, "'server.b2'"),
    "trim beta 0.5": (_every, lambda o: {"server.trim_beta": 0.5}, "'server.trim_beta'"),
    "17-bit quantization": (
        _every,
        lambda o: {"client.quantize_bits": 17},
        "'client.quantize_bits' must be in [0, 16]",
    ),
    "dp delta 1": (_every, lambda o: {"dp.delta": 1.0}, "'dp.delta'"),
    "alpha 0": (_every, lambda o: {"data.alpha": 0.0}, "'data.alpha' must be > 0"),
    "mnist1d samples 9": (_every, lambda o: {"mnist1d.num_samples": 9}, "'mnist1d.num_samples'"),
    "digits test fraction 1": (
        _every,
        lambda o: {"digits.test_fraction": 1.0},
        "'digits.test_fraction'",
    ),
    "unknown algorithm": (
        _every,
        lambda o: {"algorithm.name": o["algorithm.name"] + "x"},
        "algorithm.name",
    ),
    "unknown aggregator": (
        _every,
        lambda o: {"server.aggregator": "average"},
        "'server.aggregator' must be one of",
    ),
    "unknown client optimizer": (
        _every,
        lambda o: {"client.optimizer": "lamb"},
        "'client.optimizer' must be one of",
    ),
    "natural as data.partition": (
        _every,
        lambda o: {"data.partition": "natural"},
        "'data.partition' must be one of",
    ),
    "augmenting flat features": (_every, lambda o: {"client.augment": "flip"}, "client.augment"),
    "a token model on features": (
        _every,
        lambda o: {"model.student": "lstm-4-8"},
        "'model.student': lstm-4-8 takes int32 token ids",
    ),
    "a malformed model": (_every, lambda o: {"model.student": "mlp-0"}, "'model.student'"),
    "an unknown key": (_every, lambda o: {"client.lrr": 0.1}, "unknown config key 'client.lrr'"),
    "min size above the data": (
        _every,
        lambda o: {_partition_key(o): "dirichlet", "data.min_client_size": 10**6},
        "min_size * num_clients",
    ),
    "more clients than examples": (  # on digits: synthetic would draw a user per client
        _every,
        lambda o: {"data.name": "digits", "data.partition": "iid", "data.num_clients": 10**6},
        "exceeds the number of examples",
    ),
    "fewer shards than labels": (  # not on synthetic, whose users may hold fewer labels
        _every,
        lambda o: {
            "data.name": "digits" if o["data.name"] == "synthetic" else o["data.name"],
            "data.partition": "shards",
            "data.shards_per_client": 1,
            "data.num_clients": max(o["clients_per_round"], 2),
        },
        "shards cannot cover 10 labels",
    ),
    "no proxy set": (
        lambda spec: spec.name in WITH_PROXY,
        lambda o: {"data.proxy_fraction": 0.0, "server.distill_steps": 1},
        "set data.proxy_fraction > 0",
    ),
    "public set above the proxy": (
        lambda spec: spec.name in ("fedmd", "dsfl"),
        lambda o: {f"{o['algorithm.name']}.public_size": 10**6},
        "public_size must be <= the",
    ),
    "groups on a one-model algorithm": (
        lambda spec: not spec.groups,
        lambda o: {"model.student_groups": "linear,mlp-4"},
        "'model.student_groups'",
    ),
    "a cohort not a multiple of the groups": (
        lambda spec: spec.groups,
        lambda o: {"model.student_groups": "linear,mlp-4", "clients_per_round": 1},
        "must be a multiple of the 2 model groups",
    ),
    "stragglers where there are none": (
        lambda spec: not spec.stragglers,
        lambda o: {"client.straggler_fraction": 0.5, "client.epochs": 2},
        "has no stragglers",
    ),
    "partial work of one epoch": (
        lambda spec: spec.stragglers,
        lambda o: {
            "client.straggler_fraction": 0.5,
            "client.epochs": 1,
            "client.drop_stragglers": False,
        },
        "needs client.epochs >= 2",
    ),
    "dropping every client": (
        lambda spec: spec.stragglers,
        lambda o: {"client.straggler_fraction": 1.0, "client.drop_stragglers": True},
        "would drop every client",
    ),
    "robust aggregation where refused": (
        lambda spec: not spec.robust,
        lambda o: {"server.aggregator": "median"},
        "'server.aggregator'",
    ),
    "an attack where refused": (
        lambda spec: not spec.robust,
        lambda o: {"attack.kind": "sign_flip", "attack.fraction": 0.5},
        "'attack.kind'",
    ),
    "DP where refused": (
        lambda spec: not (spec.robust or spec.private_updates),
        lambda o: {"dp.clip_norm": 1.0},
        "'dp.clip_norm'",
    ),
    "output DP where refused": (
        lambda spec: not spec.private_outputs,
        lambda o: {"dp.output_clip_norm": 1.0},
        "'dp.output_clip_norm'",
    ),
    "output DP without server distillation": (
        lambda spec: spec.private_outputs and spec.private_updates,
        lambda o: {"dp.output_clip_norm": 1.0, "server.distill_steps": 0},
        "publishes no outputs for distillation in this run",
    ),
    "DP-FedAvg without output DP on distilled logits": (
        lambda spec: spec.private_outputs and spec.private_updates,
        lambda o: {"dp.clip_norm": 1.0, "dp.output_clip_norm": 0.0, "server.distill_steps": 1},
        "set dp.clip_norm and dp.output_clip_norm together",
    ),
    "output DP with architecture groups": (
        lambda spec: spec.groups and spec.private_outputs and spec.name in WITH_PROXY,
        lambda o: {
            "model.student_groups": "linear,mlp-4",
            "clients_per_round": 2,
            "data.num_clients": max(o["data.num_clients"], 4),
            "server.distill_steps": 1,
            "dp.output_clip_norm": 1.0,
            "dp.clip_norm": 1.0 if SPECS[o["algorithm.name"]].private_updates else 0.0,
            "client.straggler_fraction": 0.0,
        },
        "groups sample each group apart",
    ),
    "quantization where refused": (
        lambda spec: not spec.robust,
        lambda o: {"client.quantize_bits": 8},
        "'client.quantize_bits'",
    ),
    "dropping non-finite updates where refused": (
        lambda spec: not spec.robust,
        lambda o: {"server.drop_nonfinite": True},
        "'server.drop_nonfinite'",
    ),
    "DP with quantization": (
        lambda spec: spec.robust,
        lambda o: {"dp.clip_norm": 1.0, "client.quantize_bits": 8},
        "'client.quantize_bits'",
    ),
    "DP with an aggregator": (
        lambda spec: spec.robust,
        lambda o: {"dp.clip_norm": 1.0, "server.aggregator": "median", "client.quantize_bits": 0},
        "'dp.clip_norm'",
    ),
    "an attack on nobody": (
        lambda spec: spec.robust,
        lambda o: {"attack.kind": "noise", "attack.fraction": 0.0},
        "'attack.fraction'",
    ),
    "an attack by everyone": (
        lambda spec: spec.robust,
        lambda o: {"attack.kind": "scale", "attack.fraction": 0.99, "dp.clip_norm": 0.0},
        "'attack.fraction'",
    ),
    "a budget without DP": (
        lambda spec: spec.robust,
        lambda o: {"dp.epsilon_budget": 1.0, "dp.clip_norm": 0.0},
        "'dp.epsilon_budget'",
    ),
    "a budget below one round": (
        lambda spec: spec.robust,
        lambda o: {
            "dp.clip_norm": 1.0,
            "dp.noise_multiplier": 1.0,
            "dp.epsilon_budget": 1e-9,
            "server.aggregator": "mean",
            "attack.kind": "none",
            "client.quantize_bits": 0,
        },
        "is below one round's epsilon",
    ),
    "Krum without enough clients": (
        lambda spec: spec.robust,
        lambda o: {
            "server.aggregator": "krum",
            "server.krum_f": o["clients_per_round"],
            "dp.clip_norm": 0.0,
        },
        "'server.krum_f'",
    ),
    "an algorithm option out of range": (
        lambda spec: spec.name in ALGORITHM_OUT_OF_RANGE,
        lambda o: dict([ALGORITHM_OUT_OF_RANGE[o["algorithm.name"]]]),
        "",  # the key, checked below
    ),
}

#: One out-of-range value of each algorithm's own options.
ALGORITHM_OUT_OF_RANGE = {
    "fedprox": ("fedprox.mu", -1.0),
    "fedntd": ("fedntd.temperature", 0.0),
    "teacher_student": ("teacher_student.temperature", 0.0),
    "fedkd": ("fedkd.energy_start", 1.5),
    "fedmd": ("fedmd.public_epochs", 0),
    "dsfl": ("dsfl.aggregation", "max"),
    "fd": ("fd.gamma", -1.0),
}


def _no_simulation(*args, **kwargs):
    """Stands in for ``simulate.run``: a refused config must never reach a simulation."""
    raise AssertionError("simulate.run was reached")


#: Refusals compile nothing (a fraction of a second each): two configs per mistake, no
#: shrinking (dozens of rebuilt configs; the failure message holds the whole config).
REFUSALS = settings(RUNS, max_examples=2)


@pytest.mark.parametrize("what", sorted(MISTAKES))
def test_an_invalid_config_is_one_error_line_and_exit_2(what):
    which, change, fragment = MISTAKES[what]
    algos = [a for a in ALGORITHMS if which(SPECS[a])]

    @REFUSALS
    @seed(zlib.crc32(what.encode()))
    @given(st.sampled_from(algos).flatmap(valid_runs))
    def refused(o):
        """Makes the mistake on ``o`` and runs the command with simulations forbidden."""
        o = {**o, **change(o)}
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(simulate, "run", _no_simulation)
            code, out, err = run_cli(o)
        lines = err.strip().splitlines()
        assert code == 2, (o, code, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (o, err)
        assert "Traceback" not in err and out == "", (o, out)
        want = fragment or f"'{ALGORITHM_OUT_OF_RANGE.get(o['algorithm.name'], ('',))[0]}'"
        assert want in lines[0], (want, lines[0], o)

    refused()


def _supported_options(spec) -> list[tuple[str, dict]]:
    """What ``fedjax-kd list`` says ``spec`` supports, each as a config's overrides."""
    options = []
    if spec.stragglers:
        options.append(("stragglers", {"client.straggler_fraction": 0.5, "client.epochs": 2}))
    if spec.groups:
        groups = {"model.student_groups": "linear,mlp-4", "clients_per_round": 2}
        options.append(("groups", groups))
    if spec.teacher:
        options.append(("teacher", {"model.teacher": "mlp-8"}))
    if spec.robust:
        options += [
            ("robust aggregation", {"server.aggregator": "median"}),
            ("attacks", {"attack.kind": "sign_flip", "attack.fraction": 0.2}),
            ("DP", {"dp.clip_norm": 1.0}),
            ("DP (Poisson)", {"dp.clip_norm": 1.0, "dp.sampling": "poisson"}),
            ("DP (adaptive)", {"dp.clip_norm": 1.0, "dp.adaptive": True}),
            ("uplink codecs", {"client.topk_fraction": 0.1, "client.error_feedback": True}),
        ]
    if spec.private_updates:
        options.append(("DP-FedAvg", {"dp.clip_norm": 1.0, "server.distill_steps": 0}))
    if spec.private_outputs:
        both = {"dp.clip_norm": 1.0, "server.distill_steps": 1} if spec.private_updates else {}
        options.append(("DP on published outputs", {"dp.output_clip_norm": 1.0, **both}))
    return options


SUPPORTED = [
    pytest.param(name, option, id=f"{name}: {what}")
    for name in ALGORITHMS
    for what, option in _supported_options(SPECS[name])
]


@pytest.mark.parametrize("algo,option", SUPPORTED)
def test_what_the_list_says_an_algorithm_supports_is_accepted(algo, option):
    """``fedjax-kd list``'s "supports/needs" line is a promise: each option it names passes
    validation (on digits, with the proxy set and public sizes the algorithm needs)."""
    o = {"algorithm.name": algo, "data.num_clients": 10, "clients_per_round": 5}
    if algo in WITH_PROXY:
        o["data.proxy_fraction"] = 0.1
    if algo in ("fedmd", "dsfl"):
        o[f"{algo}.public_size"] = 8
    o.update(option)
    try:
        experiment.resolve(None, [(k, as_text(v)) for k, v in o.items()])
    except experiment.ConfigError as e:
        pytest.fail(f"{algo} with {option}: {e}")


# ---------------------------------------------------------------- DP-FedAvg's accounting

#: Noise multipliers whose square underflows (found by the valid-config search above:
#: ``dp.noise_multiplier=9.36e-190`` passed validation and the run crashed).
TINY_NOISE = [5e-324, 1e-200, 1e-170, 1e-160, 1e-156, 1e-150]


NOISE = st.floats(0, 10) | st.sampled_from(TINY_NOISE)


@settings(FAST, max_examples=40)
@given(NOISE, NOISE, st.integers(2, 10**6), st.integers(1, 64), st.integers(1, 500))
@example(1e-160, 1e-3, 10, 2, 1)  # epsilon 0.0 with almost no noise, 4e6 with more
@example(1e-200, 1.0, 10, 2, 1)  # ZeroDivisionError inside dp_accounting
def test_dp_epsilon_never_crashes_and_shrinks_with_noise(noise_a, noise_b, num_clients, k, rounds):
    """``privacy.epsilon`` for any noise ``>= 0`` (what ``dp.noise_multiplier`` allows): a
    number ``>= 0`` or ``inf`` (no noise), never a crash; more noise never gives a larger
    epsilon, more rounds never a smaller one (both hold of the true privacy loss)."""
    k = min(k, num_clients)
    less, more = sorted([noise_a, noise_b])
    eps = privacy.epsilon(num_clients, k, less, rounds, 1e-5)
    assert eps == math.inf or (math.isfinite(eps) and eps >= 0), eps
    if less == 0:
        assert eps == math.inf
    noisier = privacy.epsilon(num_clients, k, more, rounds, 1e-5)
    assert noisier <= eps * (1 + 1e-9), (less, eps, more, noisier)
    assert privacy.epsilon(num_clients, k, less, rounds + 1, 1e-5) >= eps


class _Reached(Exception):
    """Raised by the stand-in of ``simulate.run``: the config got as far as a simulation."""


def _reached(*args, **kwargs):
    """Stands in for ``simulate.run`` where reaching it is allowed (nothing compiles)."""
    raise _Reached


@settings(FAST, max_examples=12)
@given(st.floats(0, 4) | st.sampled_from(TINY_NOISE), st.floats(1e-6, 1e3))
@example(1e-200, 1.0)  # ZeroDivisionError traceback from the budget's round count
def test_a_dp_budget_runs_or_is_one_error_line(noise, budget):
    """``dp.epsilon_budget`` cuts the rounds before anything compiles: whatever the noise,
    the command reaches the simulation or refuses in one line (exit 2), never a traceback."""
    o = {
        "rounds": 3,
        "clients_per_round": 2,
        "data.num_clients": 10,
        "data.partition": "iid",
        "model.student": "linear",
        "client.epochs": 1,
        "dp.clip_norm": 1.0,
        "dp.noise_multiplier": noise,
        "dp.epsilon_budget": budget,
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(simulate, "run", _reached)
        try:
            code, out, err = run_cli(o)
        except _Reached:
            return
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert "'dp.epsilon_budget'" in lines[0], lines[0]


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raises TimeoutError in the main thread once ``seconds`` have passed (SIGALRM)."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@settings(FAST, max_examples=4)
@given(st.sampled_from([10.0, 1e3, 1e6, 1e9]), st.integers(1, 3))
@example(1e9, 1)  # rounds_within searches up to 2**31 PLD rounds: hours
def test_a_pld_budget_is_settled_in_seconds(budget, rounds):
    """A budget with Poisson sampling and the PLD accountant: a run of 1-3 rounds needs the
    epsilon of at most 4 rounds, so it reaches the simulation (or one error line) in
    seconds, whatever the budget."""
    o = {
        "rounds": rounds,
        "clients_per_round": 4,
        "data.num_clients": 6,
        "data.partition": "iid",
        "model.student": "linear",
        "client.epochs": 1,
        "dp.clip_norm": 1.0,
        "dp.noise_multiplier": 0.6,
        "dp.sampling": "poisson",
        "dp.accountant": "pld",
        "dp.epsilon_budget": budget,
    }
    with pytest.MonkeyPatch.context() as patch, time_limit(10):
        patch.setattr(simulate, "run", _reached)
        try:
            code, out, err = run_cli(o)
        except _Reached:
            return
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
