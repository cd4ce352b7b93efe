"""The compiled round and the run loop; drives any FederatedAlgorithm.

One round is ``step(state, data, server_data, rounds_key, r) -> (state, metrics)``:

    key_r  = fold_in(rounds_key, r)
    ids    = sample_clients(fold_in(key_r, SAMPLE), num_clients, K)   # uniform, no replacement
    cohort = gather_clients(data, ids)                                # [K, N, ...]
    state, metrics = algorithm.round(state, cohort, fold_in(key_r, CLIENTS), server_data)

``server_data`` holds the server's own arrays (``"proxy_x"`` when the dataset
has an unlabeled proxy set); the sampled ids come with the cohort
(``Cohort.ids``, for algorithms that keep per-client state).

It is compiled ahead of time once (``jax.jit(...).lower(...).compile()``), so
the whole run uses one executable; the round index is a traced argument.
Randomness is a pure function of ``(seed, round)``: the initial state uses
``fold_in(key(seed), INIT)`` and round r uses ``fold_in(fold_in(key(seed),
ROUNDS), r)``, so any round can be replayed without replaying the ones before.

Client and server data travel as arguments, never as a closure constant (``jit`` would
bake captured arrays into the program).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from fedjax_kd import losses
from fedjax_kd.checkpoint import Restored
from fedjax_kd.data import ClientData, Cohort, FederatedDataset, sample_clients
from fedjax_kd.data.federated import aligned_zeros
from fedjax_kd.types import FederatedAlgorithm

# Round metrics with a fixed meaning; every other scalar metric is recorded as is.
RESERVED_METRICS = ("train_loss", "uplink_bytes", "downlink_bytes", "finite")

#: Per-round counts that are also summed over the run (``cumulative_<name>`` in
#: every record, ``<name>`` in the summary; kept across a resume).
CUMULATIVE_METRICS = ("dropped_nonfinite", "cohort_overflow")

#: The most rounds one compiled loop runs between host syncs (``rounds_per_call``
#: is clipped to it: its metrics buffer has one row per round). Grouping rounds
#: into blocks changes no bit, so the clip changes only the number of dispatches.
MAX_ROUNDS_PER_CALL = 10_000

# Named random streams (fold_in constants).
INIT, ROUNDS = 0, 1
SAMPLE, CLIENTS, DATA, AUGMENT = 0, 1, 2, 3


class NonFiniteError(RuntimeError):
    """Raised when a round's aggregate update contains NaN or Inf."""


class RunResult(NamedTuple):
    """Outcome of :func:`run`.

    Attributes:
      state: final algorithm state.
      history: one dict per evaluation made by this call (the lines of
        ``metrics.jsonl``; after a resume only those past the checkpoint, while
        ``metrics.jsonl`` holds them all). ``wall_s`` continues across resumes.
      summary: final numbers (the content of ``summary.json``).
    """

    state: Any
    history: list[dict]
    summary: dict


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """``(init_key, rounds_key)`` for a run with ``seed``."""
    root = jax.random.key(seed)
    return jax.random.fold_in(root, INIT), jax.random.fold_in(root, ROUNDS)


def to_device(tree):
    """``tree``'s NumPy leaves as device arrays; JAX arrays stay as they are.

    ``jax.device_put(..., may_alias=True)``: on CPU a 64-byte-aligned NumPy
    array (what :mod:`fedjax_kd.data` builds) becomes a device array without a
    copy, so a population is held once; the caller must not write to the
    NumPy arrays while the device arrays are in use.
    """

    def put(leaf):
        if isinstance(leaf, jax.Array):
            return leaf
        return jax.device_put(np.asarray(leaf), may_alias=True)

    return jax.tree.map(put, tree)


def _client_mesh(devices=None) -> Mesh | None:
    """A 1-D mesh over ``devices`` (default: all) with axis ``clients``; None for one."""
    devices = jax.devices() if devices is None else list(devices)
    if len(devices) < 2:
        return None
    return Mesh(np.array(devices), ("clients",), axis_types=(AxisType.Auto,))


def _replicate(tree, sharding: NamedSharding):
    """Places every leaf of ``tree`` fully replicated on ``sharding``'s devices.

    Built from host copies with ``make_array_from_callback``, so it also works
    when the mesh spans devices of other processes (multi-host runs, where
    every process holds the same values).
    """

    def place(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = _replicate(jax.random.key_data(leaf), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        host = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree)


def jit_round(algorithm: FederatedAlgorithm) -> Callable:
    """``algorithm.round`` compiled for arrays gathered by hand (a test, a notebook).

    Returns ``round(state, client_data, key, server_data=None, ids=None) ->
    (state, metrics)``: ``client_data`` is a padded
    :class:`~fedjax_kd.data.ClientData` ``[K, N, ...]`` and ``ids`` the
    clients' ids (default ``0..K-1``; the rows of per-client stores), made a
    :class:`~fedjax_kd.data.Cohort` inside the trace
    (:meth:`~fedjax_kd.data.Cohort.from_data`: a Cohort is not a pytree, so
    it cannot cross ``jax.jit`` itself).
    """

    def round_on_arrays(state, client_data, key, server_data=None, ids=None):
        return algorithm.round(state, Cohort.from_data(client_data, ids), key, server_data)

    return jax.jit(round_on_arrays)


def _make_round_step(
    algorithm: FederatedAlgorithm,
    *,
    num_clients: int,
    clients_per_round: int,
    max_local_examples: int,
    client_chunk_size: int | None = None,
    mesh: Mesh | None = None,
    augment: Callable | None = None,
) -> Callable:
    """Returns the pure round ``step(state, data, server_data, rounds_key, r)``.

    Args:
      algorithm: the federated algorithm.
      num_clients: population size (clients in ``data``).
      clients_per_round: cohort size K.
      max_local_examples: examples a client trains on per round (the cap of
        :func:`fedjax_kd.data.gather_cohort`; >= the largest client = all).
      client_chunk_size: clients vmapped together; chunks run in sequence
        (algorithms built on ``aggregate.sum_over_clients``); None = all.
      mesh: shard the cohort's client axis over this mesh's ``clients`` axis.
      augment: ``augment(key, x)`` applied to each sampled client's data
        (:func:`fedjax_kd.augment.make_augment`) with keys from
        ``fold_in(round_key, AUGMENT)``; None = none.
    """
    if not 1 <= clients_per_round <= num_clients:
        raise ValueError(
            f"clients_per_round must be in [1, {num_clients}], got {clients_per_round}"
        )

    sample = algorithm.sample_cohort or sample_clients
    constrain, multiple = None, 1
    if mesh is not None:
        sharding = NamedSharding(mesh, P("clients"))
        multiple = mesh.devices.size

        def constrain(cohort_data: ClientData) -> ClientData:
            return jax.lax.with_sharding_constraint(cohort_data, sharding)

    def step(state, data, server_data: dict, rounds_key: jax.Array, r: jax.Array):
        key_r = jax.random.fold_in(rounds_key, r)
        ids = sample(jax.random.fold_in(key_r, SAMPLE), num_clients, clients_per_round)
        members = drawn = None
        if isinstance(ids, tuple):  # a variable-size cohort (privacy.SampledCohort)
            ids, members, drawn = ids
        cohort = Cohort.from_store(
            data,
            ids,
            max_local_examples,
            jax.random.fold_in(key_r, DATA),
            chunk_size=client_chunk_size,
            multiple=multiple,
            constrain=constrain,
            augment=augment,
            augment_key=None if augment is None else jax.random.fold_in(key_r, AUGMENT),
            members=members,
            drawn=drawn,
        )
        return algorithm.round(state, cohort, jax.random.fold_in(key_r, CLIENTS), server_data)

    return step


def _make_evaluate(
    build: Callable, *, batch_size: int, test_clients: int = 0, accuracy_ignore=()
) -> Callable:
    """Returns ``evaluate(hp, state, x, y, mask[, client]) -> {name: results}``.

    ``results`` is ``(accuracy, loss)``, plus ``per_client`` with test clients.

    ``build(hp)`` makes the algorithm whose ``eval_models`` are evaluated.

    ``x``/``y``/``mask`` hold the test set padded to whole batches of
    ``batch_size`` (see :func:`batch_test_set`); batches are scanned so memory
    stays bounded by one batch of activations. With ``test_clients > 0``
    the test set has per-client test data: ``client`` gives each example's
    test client, and each model's result also holds its number of correct
    examples per test client (float32 ``[test_clients]``), for
    :func:`client_accuracies`.

    Labels ``[B]`` take logits ``[B, C]``; per-position targets ``[B, T]``
    (next-token tasks) take ``[B, T, C]``, and then the loss is the mean over
    the real targets (labels ``>= 0``) and the accuracy the fraction of
    correct ones among the targets not in ``accuracy_ignore`` (the
    StackOverflow papers' accuracy without out-of-vocabulary and end tokens).
    Logits with more leading axes are several models (e.g. one per client):
    their accuracy and loss are averaged.
    """
    ignore = tuple(int(t) for t in accuracy_ignore)

    def evaluate(hp, state, x, y, mask, client=None):
        results = {}
        targets = losses.target_mask(y, mask)
        counted = accuracy_mask(y, targets, ignore)
        for name, (apply_fn, params) in build(hp).eval_models(state).items():

            def body(carry, batch, apply_fn=apply_fn, params=params):
                xb, yb, tb, cb = batch[:4]
                logits = apply_fn(params, xb)
                # Leading axes before the labels' are several models: average them.
                num_models = math.prod(logits.shape[: logits.ndim - yb.ndim - 1])
                labels = jnp.broadcast_to(yb, logits.shape[:-1])
                hits = jnp.where(cb, losses.accuracy(logits, labels), 0.0)
                correct = jnp.sum(hits)
                loss = jnp.sum(jnp.where(tb, losses.cross_entropy(logits, labels), 0.0))
                out = (carry[0] + correct / num_models, carry[1] + loss / num_models)
                if test_clients:
                    per_example = hits.reshape(-1, *yb.shape).sum(0) / num_models
                    per_example = per_example.reshape(yb.shape[0], -1).sum(1)
                    per_client = jax.ops.segment_sum(per_example, batch[4], test_clients)
                    out = (*out, carry[2] + per_client)
                return out, None

            zero = jnp.zeros((), jnp.float32)
            init = (zero, zero)
            if test_clients:
                init = (*init, jnp.zeros((test_clients,), jnp.float32))
            arrays = (x, y, targets, counted) + (() if client is None else (client,))
            sums, _ = jax.lax.scan(body, init, arrays)
            n_acc = jnp.maximum(jnp.sum(counted), 1).astype(jnp.float32)
            n_loss = jnp.maximum(jnp.sum(targets), 1).astype(jnp.float32)
            results[name] = (sums[0] / n_acc, sums[1] / n_loss, *sums[2:])
        return results

    return evaluate


def accuracy_mask(y, targets, accuracy_ignore=()):
    """The targets that accuracy counts: ``targets`` without the ids in ``accuracy_ignore``.

    Args:
      y: labels (``[..., B]``) or per-position targets (``[..., B, T]``),
        NumPy or JAX.
      targets: bool of ``y``'s shape, the real targets
        (:func:`fedjax_kd.losses.target_mask`).
      accuracy_ignore: target ids not counted (out-of-vocabulary, end of
        sentence); empty = every real target.
    """
    xp = np if isinstance(y, np.ndarray) else jnp
    counted = targets
    for token in accuracy_ignore:
        counted = counted & (y != token)
    return xp.asarray(counted)


def counted_per_example(dataset: FederatedDataset) -> np.ndarray:
    """Per test example, the targets its accuracy counts (1 each for class labels)."""
    y = np.asarray(dataset.test_y)
    counted = accuracy_mask(y, y >= 0, dataset.accuracy_ignore)
    return counted.reshape(len(y), -1).sum(1).astype(np.int64)


def client_accuracies(correct: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """The per-client evaluation of the papers from correct examples per test client.

    Args:
      correct: ``[num_test_clients]`` correct test examples of each client.
      counts: ``[num_test_clients]`` test examples of each client.

    Returns:
      ``test_accuracy_clients_weighted`` (the example-weighted mean over test
      clients, which equals the pooled accuracy), ``..._mean`` (the
      unweighted mean over clients with test data, as LEAF and FedAvg's
      per-client tables) and ``..._p10`` (the 10th percentile client, NumPy's
      linear interpolation).
    """
    correct = np.asarray(correct, np.float64)
    counts = np.asarray(counts, np.int64)
    has = counts > 0
    accuracy = correct[has] / counts[has]
    return {
        "test_accuracy_clients_weighted": float(correct[has].sum() / max(counts.sum(), 1)),
        "test_accuracy_clients_mean": float(accuracy.mean()) if has.any() else 0.0,
        "test_accuracy_clients_p10": float(np.percentile(accuracy, 10)) if has.any() else 0.0,
    }


def num_test_clients(dataset: FederatedDataset) -> int:
    """The number of test clients (0 for a pooled test set: no ``test_client``)."""
    c = dataset.test_client
    return 0 if c is None or not len(c) else int(c.max()) + 1


def batch_test_set(x: np.ndarray, y: np.ndarray, batch_size: int, client=None):
    """Pads a test set to whole batches: ``[nb, batch, ...]`` arrays and a mask.

    With ``client`` (each example's test client), its padded batches come last.
    """
    n = len(y)
    batch_size = max(1, min(batch_size, n))
    nb = math.ceil(n / batch_size)
    # Aligned, so that to_device takes them without another copy.
    xp = aligned_zeros((nb * batch_size, *x.shape[1:]), x.dtype)
    yp = aligned_zeros((nb * batch_size, *y.shape[1:]), y.dtype)
    xp[:n], yp[:n] = x, y
    mask = np.arange(nb * batch_size) < n
    shape = (nb, batch_size)
    out = (xp.reshape(*shape, *x.shape[1:]), yp.reshape(*shape, *y.shape[1:]), mask.reshape(shape))
    if client is None:
        return out
    cp = np.zeros(nb * batch_size, np.int32)
    cp[:n] = client
    return (*out, cp.reshape(shape))


class Point(NamedTuple):
    """One run of a parallel group (:func:`run_parallel`).

    Attributes:
      seed: the run's seed (its keys are :func:`seed_keys`, as when it runs alone).
      dataset: its data; the group's datasets must agree in every shape but
        the clients' padded length (:func:`stack_datasets`).
      hparams: its values of the hyperparameters that reach the compiled round
        as arguments, ``{name: float}`` (the same names for every point of a
        group); ``build`` receives them as float32 scalars.
      on_eval, on_checkpoint, resume: as for :func:`run`, for this point.
    """

    seed: int
    dataset: FederatedDataset
    hparams: Mapping[str, float] = {}
    on_eval: Callable[[dict], None] | None = None
    on_checkpoint: Callable[[int, Any, dict], None] | None = None
    resume: Restored | None = None


def _pad_examples(train, length: int):
    """``train`` with its example axis zero-padded to ``length`` (exact: padding is masked).

    A :class:`~fedjax_kd.data.ClientData`'s per-client axis ``N``; a
    :class:`~fedjax_kd.data.RaggedClientData`'s row axis (offsets and counts
    stay).
    """
    axis = 1 if isinstance(train, ClientData) else 0
    pad = length - train.x.shape[axis]
    if pad == 0:  # as it is: no copy (an aligned array stays aliasable by to_device)
        return train

    def padded(a):
        widths = [(0, 0)] * np.ndim(a)
        widths[axis] = (0, pad)
        return np.pad(np.asarray(a), widths)

    return train._replace(x=padded(train.x), y=padded(train.y))


def _example_length(train) -> int:
    """The padded example axis of ``train``: ``N`` (ClientData) or the rows (ragged)."""
    return train.x.shape[1 if isinstance(train, ClientData) else 0]


def dataset_shapes(dataset: FederatedDataset) -> tuple:
    """Every shape of ``dataset`` that a compiled round depends on, but the padded length.

    Points whose datasets have equal ``dataset_shapes`` can share one program
    (:func:`stack_datasets` pads their clients to the longest).
    """
    d = dataset
    proxy = None if d.proxy_x is None else d.proxy_x.shape
    return (type(d.train).__name__, d.num_clients, d.feature_shape, d.num_classes,
            d.test_x.shape, proxy, str(d.train.x.dtype), num_test_clients(d),
            d.test_y.shape, d.accuracy_ignore)  # fmt: skip


def _host_arrays(dataset: FederatedDataset, length: int, eval_batch_size: int):
    """``(train padded to length, test batches, server_data)`` of one dataset, on the host."""
    train = _pad_examples(dataset.train, length)
    test = batch_test_set(dataset.test_x, dataset.test_y, eval_batch_size, dataset.test_client)
    server = {} if dataset.proxy_x is None else {"proxy_x": dataset.proxy_x}
    return train, test, server


def stack_datasets(datasets, eval_batch_size: int):
    """The arrays of several points' datasets with a leading point axis.

    Each client's data is zero-padded to the longest of the group (padding
    changes no number: examples past a client's count are masked everywhere),
    then stacked. When every point has the very same dataset it is held once
    and not stacked (its vmap axis is None).

    Returns:
      ``(train, test, server_data, axis)``: device arrays, and 0 or None.

    Raises:
      ValueError: the datasets differ in another shape (:func:`dataset_shapes`:
        number of clients, features, test or proxy set), so they cannot share
        one program.
    """
    first = datasets[0]
    for d in datasets[1:]:
        if dataset_shapes(d) != dataset_shapes(first):
            raise ValueError(
                f"the points' datasets differ in shape ({dataset_shapes(first)} vs "
                f"{dataset_shapes(d)}); they cannot run as one program"
            )
    if all(d is first for d in datasets):
        host, axis = _host_arrays(first, _example_length(first.train), eval_batch_size), None
    else:
        length = max(_example_length(d.train) for d in datasets)
        arrays = [_host_arrays(d, length, eval_batch_size) for d in datasets]
        host, axis = jax.tree.map(lambda *a: np.stack(a), *arrays), 0
    train, test, server = to_device(host)
    return train, tuple(test), server, axis


def run(
    algorithm: FederatedAlgorithm,
    dataset: FederatedDataset,
    *,
    rounds: int,
    clients_per_round: int,
    eval_every: int,
    seed: int,
    eval_batch_size: int = 1024,
    max_local_examples: int | None = None,
    client_chunk_size: int | None = None,
    mesh: Mesh | None | str = "auto",
    rounds_per_call: int = 1,
    progress: bool = True,
    on_eval: Callable[[dict], None] | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[int, Any, dict], None] | None = None,
    resume: Restored | None = None,
    name: str | None = None,
    augment: Callable | None = None,
) -> RunResult:
    """Runs ``rounds`` rounds of ``algorithm`` on ``dataset``.

    Evaluates on the test set every ``eval_every`` rounds and after the last.
    With ``on_checkpoint``, hands the state to it every ``checkpoint_every``
    rounds (0: at every evaluation) and after the last round; a later call with
    ``resume`` (what :func:`fedjax_kd.checkpoint.save` stored and
    :func:`fedjax_kd.checkpoint.latest_valid` restored) continues from there
    with results bit-identical to an uninterrupted run: round ``r``'s
    randomness is ``fold_in(rounds_key, r)``, so the state, the round and the
    cumulative byte counters are all a run carries from round to round.

    Args:
      algorithm: the federated algorithm.
      dataset: federated training data and the centralized test set.
      rounds: number of rounds (>= 1).
      clients_per_round: cohort size.
      eval_every: evaluation cadence in rounds (>= 1).
      seed: the run's seed; same seed, same results.
      eval_batch_size: test batch size.
      max_local_examples: per-round cap on each client's examples (None: the
        largest client, i.e. every client trains on all its data).
      client_chunk_size: clients vmapped at once; chunks run in sequence so
        memory grows with the chunk, not with ``clients_per_round``.
      mesh: shard the client axis over a device mesh; "auto" = all local
        devices when there are several (:func:`_client_mesh`), None = no sharding.
      rounds_per_call: run up to this many rounds inside one compiled loop
        (fewer dispatches and host syncs); blocks never cross an evaluation or
        a checkpoint. One executable runs every block (its trip count is an
        argument), so how rounds are grouped into blocks changes no bit; the
        results equal one round per call up to float rounding. The loop's
        metrics buffer holds the longest block the run can have (at most
        ``eval_every``, the checkpoint cadence, the rounds left and
        :data:`MAX_ROUNDS_PER_CALL`), so a value past that is clipped to it
        with the same bits. With 1 (the default) every round is one call of
        the round's executable, and still the host waits only once per block:
        the rounds' metrics stay on the device until the next evaluation or
        checkpoint (a non-finite round is then named; the rounds after it in
        its block ran on its NaNs).
      progress: show a progress bar on stderr.
      on_eval: called with each evaluation record as it is made.
      checkpoint_every: checkpoint cadence in rounds (0 = at every evaluation);
        used only with ``on_checkpoint``.
      on_checkpoint: called as ``on_checkpoint(round, state, extra)`` after
        each checkpoint round (after its evaluation, if any) and after the
        last; ``extra`` holds ``uplink_bytes``/``downlink_bytes`` (cumulative)
        and ``last_record`` (the latest evaluation record, or None).
      resume: start after round ``resume.round`` from ``resume.state`` (host
        arrays with the structure of ``algorithm.init``'s output) and the
        counters in ``resume.extra`` instead of from scratch.
      name: the algorithm's name in the line ``compiling NAME round (K
        clients x C chunks) ...`` printed on stderr (with ``progress``)
        before compiling starts; the progress bar follows it.
      augment: on-device augmentation of the sampled clients' training data,
        ``augment(key, x)`` (:func:`fedjax_kd.augment.make_augment`); None = none.

    Returns:
      A :class:`RunResult`.

    Raises:
      NonFiniteError: a round produced a non-finite aggregate update.
    """
    point = Point(seed, dataset, {}, on_eval, on_checkpoint, resume)
    (result,) = _run_group(
        lambda hparams: algorithm,
        [point],
        batched=False,
        rounds=rounds,
        clients_per_round=clients_per_round,
        eval_every=eval_every,
        eval_batch_size=eval_batch_size,
        max_local_examples=max_local_examples,
        client_chunk_size=client_chunk_size,
        mesh=mesh,
        rounds_per_call=rounds_per_call,
        progress=progress,
        checkpoint_every=checkpoint_every,
        name=name,
        augment=augment,
    )
    if isinstance(result, NonFiniteError):
        raise result
    return result


def run_parallel(
    build: Callable[[Mapping[str, jax.Array]], FederatedAlgorithm],
    points: Sequence[Point],
    *,
    width: int | None = None,
    **settings,
) -> list[RunResult | NonFiniteError]:
    """Runs several points as one compiled program: a leading ``vmap`` axis.

    The points share every setting of :func:`run` (``settings``: its keyword
    arguments but ``on_eval``/``on_checkpoint``/``resume``, which are per
    point, and ``mesh``: the point axis replaces client sharding) and may
    differ in their seed, their dataset's values (:func:`stack_datasets`)
    and the values of ``hparams``, which reach the program as float32
    arguments: ``build(hparams)`` is called inside the trace with traced
    scalars and returns the algorithm (it must not branch in Python on them).
    Each point keeps its own state, keys, evaluation records, byte counters
    and checkpoints, exactly as if it ran alone; its numbers equal its run
    alone up to float rounding (the vmapped matrix products and sums may
    round differently; ``tests/test_parallel.py`` states the tolerance), and
    a group of the same points gives the same bits every time. ``width``
    points run vmapped side by side and the program loops over such slices
    (:func:`over_points`; default :func:`vmap_width`: all on an accelerator,
    one at a time on CPU); the width changes the rounding, not the meaning. A point whose
    round is not finite stops (its entry is the :class:`NonFiniteError`); the
    others go on. Points that resume must all resume after the same round.

    Returns:
      One entry per point: its :class:`RunResult`, or the NonFiniteError that
      stopped it.
    """
    for key in ("on_eval", "on_checkpoint", "resume", "seed", "mesh"):
        if key in settings:
            raise TypeError(f"run_parallel: {key!r} is per point (Point) or not supported")
    if not points:
        return []
    return _run_group(
        build, list(points), batched=len(points) > 1, width=width, mesh=None, **settings
    )


def vmap_width(num_points: int) -> int:
    """How many of a group's points run side by side (vmapped) by default.

    All of them on an accelerator, where one wide program is what fills the
    device. One at a time on CPU: there the vmapped round costs as much as
    the points' rounds one after another (XLA's CPU kernels for the small
    batched matrix products do not get faster per product) and compiles
    about twice as long, so the points loop inside the program instead
    (``experiments/parallel_sweep.py`` measures both).
    """
    return num_points if jax.default_backend() != "cpu" else 1


def over_points(fn: Callable, in_axes: tuple, width: int) -> Callable:
    """``fn`` mapped over a leading point axis: vmapped ``width`` points at a time.

    ``in_axes`` says for each argument whether it has the point axis (0) or
    is shared (None). ``width`` equal to the number of points is one
    ``jax.vmap``; smaller widths loop (``jax.lax.map``) over vmapped slices
    of ``width`` points, and width 1 runs one point per loop step.
    """

    def mapped(*args):
        num_points = next(
            leaves[0].shape[0]
            for a, axis in zip(args, in_axes, strict=True)
            if axis == 0 and (leaves := jax.tree.leaves(a))
        )
        if width >= num_points:
            return jax.vmap(fn, in_axes=in_axes)(*args)
        per_point = tuple(a for a, axis in zip(args, in_axes, strict=True) if axis == 0)

        def one(xs):
            it = iter(xs)
            return fn(
                *(next(it) if axis == 0 else a for a, axis in zip(args, in_axes, strict=True))
            )

        return jax.lax.map(one, per_point, batch_size=width if width > 1 else None)

    return mapped


def _run_group(
    build,
    points: list[Point],
    *,
    batched: bool,
    width: int | None = None,
    rounds: int,
    clients_per_round: int,
    eval_every: int,
    eval_batch_size: int = 1024,
    max_local_examples: int | None = None,
    client_chunk_size: int | None = None,
    mesh: Mesh | None | str = "auto",
    rounds_per_call: int = 1,
    progress: bool = True,
    checkpoint_every: int = 0,
    name: str | None = None,
    augment: Callable | None = None,
) -> list[RunResult | NonFiniteError]:
    """The run loop of :func:`run` (one point) and :func:`run_parallel` (``batched``)."""
    if rounds < 1 or eval_every < 1:
        raise ValueError(f"rounds and eval_every must be >= 1, got {rounds}, {eval_every}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    starts = {0 if p.resume is None else p.resume.round for p in points}
    if len(starts) > 1:
        raise ValueError(f"the points resume after different rounds {sorted(starts)}")
    first = starts.pop()
    if not 0 <= first <= rounds:
        raise ValueError(f"cannot resume after round {first} of a {rounds}-round run")
    num_points = len(points)
    names_hp = sorted(points[0].hparams)
    if any(sorted(p.hparams) != names_hp for p in points):
        raise ValueError("the points of a group must set the same hparams")
    start = time.perf_counter()
    keys = [seed_keys(p.seed) for p in points]
    datasets = [p.dataset for p in points]
    if batched:
        data, test, server_data, data_axis = stack_datasets(datasets, eval_batch_size)
        hp = {k: jnp.asarray([p.hparams[k] for p in points], jnp.float32) for k in names_hp}
        init_key = jnp.stack([k[0] for k in keys])
        rounds_key = jnp.stack([k[1] for k in keys])
    else:
        (dataset,) = datasets
        host = _host_arrays(dataset, _example_length(dataset.train), eval_batch_size)
        data, test, server_data = to_device(host)
        test = tuple(test)
        hp = {k: jnp.float32(points[0].hparams[k]) for k in names_hp}
        (init_key, rounds_key), data_axis = keys[0], None
    one_hp = jax.tree.map(lambda a: a[0], hp) if batched else hp  # point 0's, for shapes
    # Host-side metrics depend on the round alone (never on the traced hparams).
    host_metrics = build(one_hp).host_metrics
    num_clients = datasets[0].num_clients
    largest = max(d.train.max_examples for d in datasets)
    cap = largest if max_local_examples is None else min(max_local_examples, largest)
    if mesh == "auto":
        mesh = _client_mesh()
    # The longest block the loop below can run: a larger buffer would only hold zeros.
    longest = min(rounds_per_call, eval_every, max(rounds - first, 1), MAX_ROUNDS_PER_CALL)
    checkpointing = any(p.on_checkpoint is not None for p in points)
    if checkpointing and checkpoint_every > 0:
        longest = min(longest, checkpoint_every)
    if progress and jax.process_index() == 0:
        chunk = min(client_chunk_size or clients_per_round, clients_per_round)
        chunks = math.ceil(clients_per_round / chunk)
        what = f"{chunk} clients x {chunks} chunk{'s' if chunks > 1 else ''}"
        if rounds_per_call > 1:
            what += f", {longest} round{'s' if longest > 1 else ''} per call"
        if batched:
            what += f", {num_points} runs in parallel"
        label = f"{name} round" if name else "the round"
        print(f"compiling {label} ({what}) ...", file=sys.stderr, flush=True)

    # One point's functions; ``build(hp)`` inside each trace makes the algorithm
    # of the (traced) hyperparameters.
    def init_fn(hp, key):
        return build(hp).init(key)

    def step_fn(hp, state, data, server_data, rounds_key, r):
        step = _make_round_step(
            build(hp),
            num_clients=num_clients,
            clients_per_round=clients_per_round,
            max_local_examples=max(cap, 1),
            client_chunk_size=client_chunk_size,
            mesh=mesh,
            augment=augment,
        )
        return step(state, data, server_data, rounds_key, r)

    test_clients = num_test_clients(datasets[0])
    evaluate_fn = _make_evaluate(
        build,
        batch_size=eval_batch_size,
        test_clients=test_clients,
        accuracy_ignore=datasets[0].accuracy_ignore,
    )
    if test_clients:
        test_counts = [
            np.bincount(d.test_client, counted_per_example(d), test_clients).astype(np.int64)
            for d in datasets
        ]
    if batched:
        width = vmap_width(num_points) if width is None else max(1, min(width, num_points))
        step_fn = over_points(step_fn, (0, 0, data_axis, data_axis, 0, None), width)
        evaluate_fn = over_points(evaluate_fn, (0, 0, *(data_axis,) * len(test)), width)

    if first == 0 and batched:
        # Each point's initial state from one compiled init (cheaper to compile than
        # a vmapped one), stacked.
        init = jax.jit(init_fn)
        per_point = [
            init(jax.tree.map(lambda a, k=k: a[k], hp), init_key[k]) for k in range(num_points)
        ]
        state = jax.tree.map(lambda *a: jnp.stack(a), *per_point)
    elif first == 0:
        state = jax.jit(init_fn)(hp, init_key)
    else:  # the restored state replaces init's: only init's structure is needed
        one_key = init_key[0] if batched else init_key
        fresh = jax.tree.structure(jax.eval_shape(init_fn, one_hp, one_key))
        restored = [jax.tree.map(np.asarray, p.resume.state) for p in points]
        if any(jax.tree.structure(s) != fresh for s in restored):
            raise ValueError("resume.state does not have the structure of algorithm.init's state")
        if batched:
            state = jax.tree.map(lambda *a: jnp.asarray(np.stack(a)), *restored)
        else:
            state = jax.tree.map(jnp.asarray, restored[0])
    jit_kwargs = {}
    if mesh is not None:
        # Everything but the cohort is replicated (also the outputs); the compiled
        # round then keeps the same shardings from round to round, and with
        # several processes (hosts) every process holds whole metrics.
        replicated = NamedSharding(mesh, P())
        hp, state, data, server_data, test, rounds_key = _replicate(
            (hp, state, data, server_data, test, rounds_key), replicated
        )
        jit_kwargs = {"out_shardings": replicated}

    args = (data, server_data, rounds_key)
    step = block = None
    if rounds_per_call == 1:
        step = jax.jit(step_fn, **jit_kwargs).lower(hp, state, *args, jnp.int32(0)).compile()
    else:
        metrics_shape = jax.eval_shape(step_fn, hp, state, *args, 0)[1]

        def block_fn(hp, state, data, server_data, rounds_key, r0, n):
            """Rounds r0..r0+n-1 (n <= longest) in one loop; metrics stacked."""

            def body(i, carry):
                s, stacked = carry
                s, metrics = step_fn(hp, s, data, server_data, rounds_key, r0 + i)
                stacked = jax.tree.map(lambda b, m: b.at[i].set(m), stacked, metrics)
                return s, stacked

            stacked = jax.tree.map(lambda m: jnp.zeros((longest, *m.shape), m.dtype), metrics_shape)
            # A traced trip count: the same executable (and loop body) runs every
            # block, whatever its length, so the grouping of rounds changes no bit.
            return jax.lax.fori_loop(0, n, body, (state, stacked))

        block = (
            jax.jit(block_fn, **jit_kwargs)
            .lower(hp, state, *args, jnp.int32(0), jnp.int32(1))
            .compile()
        )

    def advance(state, r: int, n: int):
        """Runs rounds r..r+n-1; returns the state and each round's metrics.

        Every metric has a leading point axis (of 1 without ``batched``).
        """
        if block is not None:
            state, stacked = block(hp, state, *args, jnp.int32(r), jnp.int32(n))
            stacked = jax.device_get(stacked)
            out = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)]
        else:
            # The rounds are dispatched back to back and their metrics stay on the
            # device until the block ends: one host sync per block (an evaluation
            # or a checkpoint), not one per round. A non-finite round is found
            # (and named) then; the block's later rounds ran on its NaNs.
            out = []
            for i in range(n):
                state, metrics = step(hp, state, *args, np.int32(r + i))
                out.append(metrics)
            # One transfer per metric for the whole block, not one per round.
            stacked = jax.device_get(jax.tree.map(lambda *m: jnp.stack(m), *out))
            out = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)]
        if not batched:
            out = [jax.tree.map(lambda a: np.asarray(a)[None], m) for m in out]
        return state, out

    def point_state(state, i: int):
        return state if not batched else jax.tree.map(lambda a: a[i], state)

    evaluate = jax.jit(evaluate_fn, **jit_kwargs).lower(hp, state, *test).compile()
    # jit returns dicts with sorted keys; the headline is eval_models' FIRST entry.
    names = list(build(one_hp).eval_models(point_state(state, 0)))
    compile_s = time.perf_counter() - start
    # wall_s continues from the checkpoint: the run's time, summed over processes.
    starts_at = [
        start - float(p.resume.extra.get("wall_s", 0.0)) if p.resume else start for p in points
    ]

    histories: list[list[dict]] = [[] for _ in points]
    cum_up, cum_down = [0] * num_points, [0] * num_points
    counted = {name: [0] * num_points for name in CUMULATIVE_METRICS}
    records: list[dict] = [{} for _ in points]
    for i, p in enumerate(points):
        if p.resume is not None:
            cum_up[i] = int(p.resume.extra.get("uplink_bytes", 0))
            cum_down[i] = int(p.resume.extra.get("downlink_bytes", 0))
            for name in CUMULATIVE_METRICS:
                counted[name][i] = int(p.resume.extra.get(name, 0))
            records[i] = dict(p.resume.extra.get("last_record") or {})
    errors: list[NonFiniteError | None] = [None] * num_points
    up, down = [0] * num_points, [0] * num_points
    bar = tqdm(
        total=rounds,
        initial=first,
        unit="round",
        disable=not progress or jax.process_index() != 0,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        r = first
        while r < rounds and not all(errors):
            next_eval = min(rounds, (r // eval_every + 1) * eval_every)
            stop = next_eval
            if checkpointing and checkpoint_every > 0:
                stop = min(stop, (r // checkpoint_every + 1) * checkpoint_every)
            state, per_round = advance(state, r, min(longest, stop - r))
            for i, metrics in enumerate(per_round):
                for k in range(num_points):
                    if errors[k] is not None:
                        continue
                    if not bool(metrics["finite"][k]):
                        errors[k] = NonFiniteError(
                            f"round {r + i + 1}: the aggregate update is not finite (NaN or "
                            "Inf); lower the client or server learning rate"
                        )
                        continue
                    up[k] = int(np.sum(np.asarray(metrics["uplink_bytes"][k], np.int64)))
                    down[k] = int(np.sum(np.asarray(metrics["downlink_bytes"][k], np.int64)))
                    cum_up[k] += up[k]
                    cum_down[k] += down[k]
                    for name in CUMULATIVE_METRICS:
                        if name in metrics:
                            counted[name][k] += int(np.asarray(metrics[name][k]))
                    overflow = int(np.asarray(metrics.get("cohort_overflow", [0] * num_points)[k]))
                    if overflow and jax.process_index() == 0:
                        bar.write(
                            f"warning: round {r + i + 1}: Poisson sampling drew {overflow} "
                            "clients more than the padded cohort holds; they were left out "
                            "(the epsilon does not cover this round; raise dp.max_cohort)",
                            file=sys.stderr,
                        )
            bar.update(len(per_round))
            r += len(per_round)
            live = [k for k in range(num_points) if errors[k] is None]
            if r == next_eval and live:
                results = jax.device_get(evaluate(hp, state, *test))
                if not batched:
                    results = jax.tree.map(lambda a: np.asarray(a)[None], results)
                for k in live:
                    record = {
                        "round": r,
                        "test_accuracy": float(results[names[0]][0][k]),
                        "test_loss": float(results[names[0]][1][k]),
                        **(
                            client_accuracies(results[names[0]][2][k], test_counts[k])
                            if test_clients
                            else {}
                        ),
                        "train_loss": float(metrics["train_loss"][k]),
                        "uplink_bytes": up[k],
                        "downlink_bytes": down[k],
                        "cumulative_uplink_bytes": cum_up[k],
                        "cumulative_downlink_bytes": cum_down[k],
                        "wall_s": round(time.perf_counter() - starts_at[k], 3),
                    }
                    if host_metrics is not None:
                        record.update(host_metrics(r))
                    for name in CUMULATIVE_METRICS:
                        if name in metrics:
                            record[f"cumulative_{name}"] = counted[name][k]
                    for metric, value in metrics.items():
                        # Algorithm-specific scalars (compute counters, distillation loss).
                        if metric not in RESERVED_METRICS and np.ndim(value) == 1:
                            record[metric] = np.asarray(value[k]).item()
                    if len(names) > 1:
                        for model in names:
                            acc, loss = results[model][:2]
                            record[f"{model}_test_accuracy"] = float(acc[k])
                            record[f"{model}_test_loss"] = float(loss[k])
                    records[k] = record
                    histories[k].append(record)
                    if points[k].on_eval is not None:
                        points[k].on_eval(record)
                shown = records[live[0]]["test_accuracy"]
                bar.set_postfix(test_acc=f"{shown:.4f}" + ("" if num_points == 1 else ", ..."))
            if r == rounds or (
                r % checkpoint_every == 0 if checkpoint_every > 0 else r == next_eval
            ):
                for k in live:
                    if points[k].on_checkpoint is None:
                        continue
                    extra = {
                        "uplink_bytes": cum_up[k],
                        "downlink_bytes": cum_down[k],
                        "wall_s": round(time.perf_counter() - starts_at[k], 3),
                        **{name: counted[name][k] for name in CUMULATIVE_METRICS},
                    }
                    points[k].on_checkpoint(
                        r, point_state(state, k), {**extra, "last_record": records[k] or None}
                    )
    finally:
        bar.close()
    out: list[RunResult | NonFiniteError] = []
    for k in range(num_points):
        if errors[k] is not None:
            out.append(errors[k])
            continue
        record = records[k]
        summary = {
            key: v
            for key, v in record.items()
            if key.endswith("test_accuracy") or key.endswith("test_loss")
        }
        if host_metrics is not None:
            summary.update(host_metrics(rounds))
        summary.update(
            rounds=rounds,
            train_loss=record["train_loss"],
            wall_s=round(time.perf_counter() - starts_at[k], 3),
            compile_s=round(compile_s, 3),
            uplink_bytes=cum_up[k],
            downlink_bytes=cum_down[k],
        )
        for name in CUMULATIVE_METRICS:
            if f"cumulative_{name}" in record:
                summary[name] = counted[name][k]
        out.append(RunResult(state=point_state(state, k), history=histories[k], summary=summary))
    return out
