"""Padded, stacked client data: the array layout every algorithm consumes.

A federated training set is held as one pytree of stacked arrays with a leading
client axis, so a round can ``vmap`` (or ``shard_map``) the local update over
the sampled clients without Python loops or ragged shapes:

* ``x``: ``[C, N, *feature_shape]`` features: float32, or uint8 pixels, or
  int32 token ids (:func:`feature_dtype`; a model converts them inside the
  compiled round, see ``fedjax_kd.models.prepare_inputs``)
* ``y``: int32 ``[C, N]``
* ``count``: int32 ``[C]``, the number of real examples of each client.

Client ``c`` owns positions ``0 .. count[c] - 1``; the remaining positions are
padding (zeros in ``x``, ``0`` in ``y``) and must be excluded with
:meth:`ClientData.mask`. ``N`` is the largest client size (or a caller-chosen
``pad_to``), so heavy-tailed size distributions cost memory ``C * max_size``.

Empty clients (``count == 0``) are allowed: they are useful as dummy clients
that pad a cohort to a multiple of the device count. Code that averages a loss
over one client's examples must guard against dividing by zero, and weighted
aggregation with weights ``count / count.sum()`` gives them zero weight.

x64 is off in JAX, so NumPy's float64/int64 arrays are cast explicitly to
float32/int32 here, at the host boundary (:func:`pack`), instead of silently in
``jnp.asarray``. Compact inputs keep their dtype: uint8 images take a quarter
of float32's memory and are scaled to ``[0, 1]`` only inside the round.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FEATURE_DTYPES",
    "ClientData",
    "Cohort",
    "check_cohort",
    "FederatedDataset",
    "RaggedClientData",
    "feature_dtype",
    "gather_clients",
    "gather_cohort",
    "pack",
    "pack_auto",
    "pack_ragged",
    "padded_nbytes",
    "sample_clients",
]

Array = Any  # np.ndarray or jax.Array: the same container holds both.


class ClientData(NamedTuple):
    """Per-client examples stacked along a leading client axis, padded to ``N``.

    A NamedTuple, hence a pytree: it passes through ``jit``, ``vmap`` and
    ``jax.tree.map`` as is, and is rebuilt with ``._replace``.

    Attributes:
      x: float32 ``[C, N, *feature_shape]`` features; padded rows are zero.
      y: int32 ``[C, N]`` labels, or ``[C, N, T]`` per-position targets of a
        next-token task (``-1`` where a position has none); padded rows are 0.
      count: int32 ``[C]`` number of real examples per client; the real examples
        of client ``c`` are ``x[c, :count[c]]``.
    """

    x: Array
    y: Array
    count: Array

    def mask(self) -> jax.Array:
        """Returns the bool ``[C, N]`` mask of real (non-padded) examples.

        Uses ``jnp`` so that it also works on traced arrays inside ``jit``/``vmap``
        (under ``vmap`` over clients, ``x`` is ``[N, ...]`` and ``count`` a
        scalar, and the mask is ``[N]``).
        """
        count = jnp.asarray(self.count)
        n = self.x.shape[count.ndim]
        return jnp.arange(n) < count[..., None]

    @property
    def num_clients(self) -> int:
        """Number of clients ``C`` (the leading axis)."""
        return self.x.shape[0]

    @property
    def max_examples(self) -> int:
        """Padded per-client length ``N``."""
        return self.x.shape[1]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one example's features."""
        return tuple(self.x.shape[2:])


class RaggedClientData(NamedTuple):
    """Clients' examples stored back to back, without padding.

    Heavy-tailed client sizes (Synthetic's lognormal users) make the padded
    layout ``[C, max_size, ...]`` far larger than the data; this one is
    ``[total, ...]`` plus offsets. A round gathers its cohort into a padded
    :class:`ClientData` of at most ``cap`` examples per client
    (:func:`gather_cohort`).

    Attributes:
      x: float32 ``[total, *feature_shape]``; client ``c``'s examples are rows
        ``offsets[c] : offsets[c] + count[c]``.
      y: int32 ``[total]`` labels (``[total, T]`` per-position targets).
      offsets: int32 ``[C]`` first row of each client.
      count: int32 ``[C]`` examples per client.
    """

    x: Array
    y: Array
    offsets: Array
    count: Array

    @property
    def num_clients(self) -> int:
        """Number of clients ``C``."""
        return self.count.shape[0]

    @property
    def max_examples(self) -> int:
        """The largest client's size (a Python int; needs concrete counts)."""
        return int(np.max(np.asarray(self.count), initial=0))

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one example's features."""
        return tuple(self.x.shape[1:])


#: Alignment of the arrays this module allocates: XLA's CPU client takes a
#: 64-byte-aligned NumPy array without a copy (``jax.device_put(x,
#: may_alias=True)``), so population data is held once, not on the host and
#: again as a device copy.
ALIGNMENT = 64


#: Arrays at least this large get their own anonymous memory map (page-aligned),
#: so that :func:`release_rows_after` can hand unused rows back to the OS.
_MMAP_BYTES = 64 * 2**20


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised NumPy array whose data starts on a :data:`ALIGNMENT` boundary.

    Arrays of 64 MiB or more live in an anonymous memory map of their own
    (page-aligned; :func:`release_rows_after` can shrink them in place).
    """
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dtype.itemsize
    if nbytes >= _MMAP_BYTES:
        # A private mapping: MADV_DONTNEED then frees its pages (a shared one keeps them).
        private = getattr(mmap, "MAP_PRIVATE", None)
        anonymous = getattr(mmap, "MAP_ANONYMOUS", None)
        if private is not None and anonymous is not None:
            memory = mmap.mmap(-1, nbytes, flags=private | anonymous)
            return np.frombuffer(memory, dtype, count).reshape(shape)
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def release_rows_after(a: np.ndarray, rows: int) -> np.ndarray:
    """``a[:rows]``, with the memory of the rows after it given back to the OS.

    For an array of :func:`aligned_empty` that has its own memory map (others
    are returned sliced, their memory kept): the whole pages past row
    ``rows`` are dropped (``madvise(MADV_DONTNEED)``); the rest of ``a`` must
    not be read afterwards.
    """
    base = a
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.base if isinstance(base, np.ndarray) else getattr(base, "obj", None)
    kept = a[:rows]
    if base is None or not hasattr(mmap, "MADV_DONTNEED"):
        return kept
    start_address = np.frombuffer(base, np.uint8).ctypes.data
    end_of_kept = a.ctypes.data - start_address + kept.nbytes
    start = -(-end_of_kept // mmap.PAGESIZE) * mmap.PAGESIZE
    if start < len(base):
        base.madvise(mmap.MADV_DONTNEED, start, len(base) - start)
    return kept


def aligned_zeros(shape, dtype) -> np.ndarray:
    """:func:`aligned_empty` filled with zeros."""
    out = aligned_empty(shape, dtype)
    out.fill(0)
    return out


#: The dtypes client features may have: float32 features, uint8 pixels, int32 tokens.
FEATURE_DTYPES = (np.dtype(np.float32), np.dtype(np.uint8), np.dtype(np.int32))


def feature_dtype(x) -> np.dtype:
    """The dtype features ``x`` are stored in: uint8 and int32 kept, anything else float32.

    uint8 means pixels (``models.prepare_inputs`` scales them by 1/255 inside
    the round) and int32 means token ids (looked up by an embedding); other
    integer and float dtypes become float32 features.
    """
    dtype = np.asarray(x).dtype if not hasattr(x, "dtype") else np.dtype(x.dtype)
    return dtype if dtype in FEATURE_DTYPES else np.dtype(np.float32)


def _take_rows(a: np.ndarray, order: np.ndarray, dtype, in_place: bool) -> np.ndarray:
    """``a[order]`` as ``dtype``, aligned; with ``in_place``, written over ``a`` itself.

    In place needs ``order`` increasing, which the caller checks (row ``i``
    is taken from row ``order[i] >= i``, so a block of rows written never
    holds rows a later block reads), and ``a`` of ``dtype`` already; the
    result is then a view of ``a``'s first rows (extra memory: one block of
    rows).
    """
    if in_place and a.dtype == dtype:
        block = 1 << 16
        for start in range(0, len(order), block):
            stop = min(start + block, len(order))
            a[start:stop] = a[order[start:stop]]
        return release_rows_after(a, len(order))
    out = aligned_empty((len(order), *a.shape[1:]), dtype)
    if a.dtype == dtype:
        np.take(a, order, axis=0, out=out)
    else:
        out[...] = a[order]
    return out


def pack_ragged(
    x: np.ndarray, y: np.ndarray, client_indices: Sequence[np.ndarray], *, in_place: bool = False
):
    """Like :func:`pack` but without padding: a :class:`RaggedClientData` (NumPy).

    The arrays are 64-byte aligned (:data:`ALIGNMENT`). ``in_place=True``
    lets it reuse ``x`` and ``y`` (of :func:`feature_dtype` / int32) for the result when the
    clients' rows are in increasing order (a natural partition), so the
    population is never held twice; ``x`` and ``y`` are then overwritten.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    indices = [np.asarray(idx, dtype=np.int64).reshape(-1) for idx in client_indices]
    counts = np.array([len(idx) for idx in indices], dtype=np.int64)
    if counts.sum() >= 2**31:
        raise ValueError(f"{counts.sum()} examples: more than int32 offsets can address")
    order = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    in_place = in_place and (len(order) < 2 or bool(np.all(np.diff(order) > 0)))
    return RaggedClientData(
        x=_take_rows(x, order, feature_dtype(x), in_place),
        y=_take_rows(y, order, np.int32, in_place),
        offsets=offsets,
        count=counts.astype(np.int32),
    )


def gather_cohort(
    store: ClientData | RaggedClientData, ids: jax.Array, cap: int, key: jax.Array | None = None
) -> ClientData:
    """Gathers clients ``ids`` into a padded ``[k, cap, ...]`` :class:`ClientData`.

    A client with ``count <= cap`` brings all its examples, in stored order, so
    with ``cap >= max client size`` the result equals :func:`gather_clients`
    bit for bit. A larger client brings a random window of ``cap`` consecutive
    stored examples (start uniform in ``[0, count - cap]``, drawn from
    ``fold_in(key, id)``) and counts as ``cap`` examples for the round: local
    work per client is bounded and a cohort has a static shape. Windows are
    random subsets when the stored order is random (the builders store each
    client's examples in random or i.i.d. order).

    Args:
      store: padded or ragged client data (device arrays).
      ids: int ``[k]`` client ids.
      cap: examples per client this round (static).
      key: randomness of the windows (needed only if some client exceeds cap).
    """
    count = jnp.take(store.count, ids)
    if key is None:
        start = jnp.zeros_like(count)
    else:
        u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(ids)
        start = jnp.floor(u * (jnp.maximum(count - cap, 0) + 1)).astype(jnp.int32)
    kept = jnp.minimum(count, cap)
    slot = jnp.arange(cap)
    valid = slot[None, :] < kept[:, None]
    pos = start[:, None] + slot[None, :]
    if isinstance(store, RaggedClientData):
        rows = jnp.where(valid, jnp.take(store.offsets, ids)[:, None] + pos, 0)
        x = jnp.take(store.x, rows, axis=0)
        y = jnp.take(store.y, rows, axis=0)
    else:
        pos = jnp.where(valid, pos, 0)
        if cap > store.max_examples:
            pos = jnp.minimum(pos, store.max_examples - 1)
        x = jax.vmap(lambda xc, p: jnp.take(xc, p, axis=0))(jnp.take(store.x, ids, axis=0), pos)
        y = jax.vmap(lambda yc, p: jnp.take(yc, p, axis=0))(jnp.take(store.y, ids, axis=0), pos)
    expand = valid.reshape(valid.shape + (1,) * (x.ndim - 2))
    expand_y = valid.reshape(valid.shape + (1,) * (y.ndim - 2))
    return ClientData(
        x=jnp.where(expand, x, 0).astype(x.dtype),
        y=jnp.where(expand_y, y, 0).astype(y.dtype),
        count=kept.astype(jnp.int32),
    )


class Cohort:
    """The sampled clients of a round, gathered all at once or chunk by chunk.

    Not a pytree: it is built inside the compiled round and hands out padded
    :class:`ClientData` for rows of the cohort. Every algorithm's ``round``
    takes one; :meth:`from_data` wraps arrays already gathered (a test's, a
    notebook's).

    Attributes:
      ids: int32 ``[K]`` client ids.
      chunk_size: clients trained together (vmapped) at a time; ``None`` = all
        K at once. Chunks are processed in sequence (``lax.scan``), so memory
        grows with the chunk, not with K.
      multiple: gathered row counts are padded to a multiple of this (the
        number of devices the client axis is sharded over).
      members: optional bool ``[K]``: which rows are sampled clients; the
        others pad a variable-size (Poisson) cohort to its static size and
        take no part (None: every row is a client).
      drawn: optional int32 scalar: how many clients the sampler drew (more
        than ``K`` is an overflow the round reports); None without ``members``.
    """

    def __init__(
        self,
        ids: jax.Array,
        gather_rows,
        *,
        chunk_size=None,
        multiple: int = 1,
        members: jax.Array | None = None,
        drawn: jax.Array | None = None,
    ):
        self.ids = ids
        self._gather_rows = gather_rows
        self.chunk_size = chunk_size
        self.multiple = multiple
        self.members = members
        self.drawn = drawn

    @property
    def size(self) -> int:
        """Number of clients ``K``."""
        return self.ids.shape[0]

    def gather(self, rows: jax.Array) -> ClientData:
        """Padded data of cohort rows ``rows`` (int array of positions in ``ids``)."""
        return self._gather_rows(rows)

    def materialize(self) -> ClientData:
        """Padded data of the whole cohort, ``[K, cap, ...]``."""
        return self._gather_rows(jnp.arange(self.size))

    def slice(self, start: int, stop: int) -> Cohort:
        """The sub-cohort of rows ``start:stop`` (e.g. one architecture group)."""
        return Cohort(
            self.ids[start:stop],
            lambda rows: self._gather_rows(start + rows),
            chunk_size=self.chunk_size,
            multiple=self.multiple,
            members=None if self.members is None else self.members[start:stop],
        )

    @classmethod
    def from_data(
        cls,
        data: ClientData,
        ids: jax.Array | None = None,
        *,
        chunk_size=None,
        multiple: int = 1,
        members: jax.Array | None = None,
        drawn: jax.Array | None = None,
    ) -> Cohort:
        """A cohort over an already gathered padded :class:`ClientData` ``[K, N, ...]``.

        Args:
          data: the cohort's clients, row ``k`` the ``k``-th sampled client.
          ids: int32 ``[K]`` their client ids (the rows of per-client stores:
            FedKD's mentors, the personal models); default ``0..K-1``.
          chunk_size, multiple, members, drawn: as for the constructor.
        """
        if ids is None:
            ids = jnp.arange(data.count.shape[0], dtype=jnp.int32)
        return cls(
            jnp.asarray(ids, jnp.int32),
            lambda rows: jax.tree.map(lambda a: jnp.take(a, rows, axis=0), data),
            chunk_size=chunk_size,
            multiple=multiple,
            members=members,
            drawn=drawn,
        )

    @classmethod
    def from_store(
        cls,
        store,
        ids: jax.Array,
        cap: int,
        key: jax.Array | None = None,
        *,
        chunk_size=None,
        multiple: int = 1,
        constrain=None,
        augment=None,
        augment_key: jax.Array | None = None,
        members: jax.Array | None = None,
        drawn: jax.Array | None = None,
    ):
        """A cohort gathered from a population store with :func:`gather_cohort`.

        ``constrain`` (e.g. a sharding constraint) is applied to every gathered
        :class:`ClientData`. ``augment(key, x)`` (``fedjax_kd.augment``), when
        given, transforms each gathered client's ``x`` with the key
        ``fold_in(augment_key, client_id)``. ``members`` and ``drawn``: as
        for the constructor (a Poisson cohort).
        """

        def gather_rows(rows):
            client_ids = jnp.take(ids, rows)
            out = gather_cohort(store, client_ids, cap, key)
            if augment is not None:
                keys = jax.vmap(lambda i: jax.random.fold_in(augment_key, i))(client_ids)
                out = out._replace(x=jax.vmap(augment)(keys, out.x))
            return out if constrain is None else constrain(out)

        return cls(
            ids,
            gather_rows,
            chunk_size=chunk_size,
            multiple=multiple,
            members=members,
            drawn=drawn,
        )


def check_cohort(cohort) -> None:
    """Raises TypeError, in one line, unless ``cohort`` is a :class:`Cohort`.

    Every algorithm's ``round`` takes its clients as a Cohort (their ids, and
    their data chunk by chunk); gathered arrays are wrapped explicitly with
    :meth:`Cohort.from_data`.
    """
    if not isinstance(cohort, Cohort):
        raise TypeError(
            f"a round takes a fedjax_kd.data.Cohort, got {type(cohort).__name__} "
            "(wrap gathered arrays with Cohort.from_data(client_data, ids))"
        )


#: Padded client arrays larger than this are stored ragged when the layout is
#: chosen automatically (:func:`pack_auto`; Synthetic's ``layout="auto"``).
RAGGED_ABOVE_BYTES = 2**30


def padded_nbytes(x, num_clients: int, length: int, y=None) -> int:
    """Bytes of ``num_clients`` clients' features padded to ``length`` examples each.

    With per-position labels ``y`` (``[n, T]``) their int32 targets count too
    (they are as large as token inputs); a label per example is not counted.
    """
    per_example = int(np.prod(np.shape(x)[1:], dtype=np.int64)) * feature_dtype(x).itemsize
    if y is not None and np.ndim(y) > 1:
        per_example += 4 * int(np.prod(np.shape(y)[1:], dtype=np.int64))
    return num_clients * length * per_example


def pack_auto(x: np.ndarray, y: np.ndarray, client_indices: Sequence[np.ndarray], **kwargs):
    """:func:`pack`, or :func:`pack_ragged` when the padded arrays would exceed
    :data:`RAGGED_ABOVE_BYTES` (heavy-tailed client sizes); ``kwargs`` go to
    ``pack_ragged`` (``in_place``)."""
    largest = max((len(i) for i in client_indices), default=0)
    if padded_nbytes(x, len(client_indices), largest, y) > RAGGED_ABOVE_BYTES:
        return pack_ragged(x, y, client_indices, **kwargs)
    return pack(x, y, client_indices)


def pack(
    x: np.ndarray,
    y: np.ndarray,
    client_indices: Sequence[np.ndarray],
    *,
    pad_to: int | None = None,
    max_bytes: int = 8 * 2**30,
) -> ClientData:
    """Stacks per-client subsets of ``(x, y)`` into a padded :class:`ClientData`.

    Runs on the host in NumPy and returns NumPy arrays, 64-byte aligned
    (:data:`ALIGNMENT`); move them to devices with ``jax.device_put`` when needed.

    Args:
      x: ``[num_examples, *feature_shape]`` features (uint8 pixels and int32
        tokens are kept, any other real dtype is cast to float32:
        :func:`feature_dtype`).
      y: ``[num_examples]`` integer labels, or ``[num_examples, T]``
        per-position targets (cast to int32).
      client_indices: one integer index array into ``x``/``y`` per client, e.g. the
        output of a partitioner from :mod:`fedjax_kd.data.partition`. Order is
        kept; empty arrays give empty clients.
      pad_to: padded length ``N``; defaults to the largest client size. Useful to
        give several datasets the same shape (one compilation).
      max_bytes: refuse (ValueError) to allocate padded features larger than
        this; heavy-tailed client sizes padded to the largest client blow up.

    Returns:
      A :class:`ClientData` with ``C = len(client_indices)``.

    Raises:
      ValueError: if shapes disagree or ``pad_to`` is smaller than a client.

    Example:
      >>> d = pack(np.arange(5.0)[:, None], np.arange(5), [[0, 1], [4]])
      >>> d.count.tolist(), d.x[:, :, 0].tolist()
      ([2, 1], [[0.0, 1.0], [4.0, 0.0]])
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 1 or y.ndim not in (1, 2) or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x must be [num_examples, ...] and y [num_examples] (or [num_examples, T]); "
            f"got x {x.shape}, y {y.shape}."
        )
    indices = [np.asarray(idx, dtype=np.int64).reshape(-1) for idx in client_indices]
    counts = np.array([len(idx) for idx in indices], dtype=np.int32)
    max_size = int(counts.max(initial=0))
    n = max_size if pad_to is None else int(pad_to)
    if n < max_size:
        raise ValueError(f"pad_to={pad_to} is smaller than the largest client ({max_size}).")
    num_clients = len(indices)
    dtype = feature_dtype(x)
    padded_bytes = padded_nbytes(x, num_clients, n, y)
    if padded_bytes > max_bytes:
        raise ValueError(
            f"padded client arrays would take {padded_bytes / 2**30:.1f} GiB ({num_clients} "
            f"clients x {n} examples, the largest client's size); cap the client sizes"
        )
    out_x = aligned_zeros((num_clients, n, *x.shape[1:]), dtype)
    out_y = aligned_zeros((num_clients, n, *y.shape[1:]), np.int32)
    for c, idx in enumerate(indices):
        out_x[c, : len(idx)] = x[idx]
        out_y[c, : len(idx)] = y[idx]
    return ClientData(x=out_x, y=out_y, count=counts)


@jax.jit
def gather_clients(data: ClientData, ids: Array) -> ClientData:
    """Selects clients ``ids`` from ``data`` (every field, along axis 0).

    Args:
      data: a :class:`ClientData` with ``C`` clients.
      ids: int ``[k]`` client ids, e.g. from :func:`sample_clients`.

    Returns:
      A :class:`ClientData` with ``k`` clients and the same ``N``.
    """
    return jax.tree.map(lambda a: jnp.take(a, ids, axis=0), data)


@functools.partial(jax.jit, static_argnames=("num_clients", "k"))
def sample_clients(key: jax.Array, num_clients: int, k: int) -> jax.Array:
    """Samples ``k`` distinct client ids uniformly, without replacement.

    Pure: the cohort is a function of ``key`` only. Derive the key per round,
    e.g. ``jax.random.fold_in(jax.random.key(seed), round_index)``, so that a
    run can be resumed or replayed round by round.

    Args:
      key: a JAX PRNG key.
      num_clients: population size (static).
      k: cohort size (static), ``1 <= k <= num_clients``.

    Returns:
      int32 ``[k]`` distinct ids in ``[0, num_clients)``.

    Raises:
      ValueError: if ``k`` is not in ``[1, num_clients]``.
    """
    if not 1 <= k <= num_clients:
        raise ValueError(f"Need 1 <= k <= num_clients; got k={k}, num_clients={num_clients}.")
    return jax.random.choice(key, num_clients, (k,), replace=False).astype(jnp.int32)


# eq=False: the generated __eq__ would compare NumPy arrays elementwise and fail;
# identity equality (and hashing) is what a frozen record of arrays needs.
@dataclasses.dataclass(frozen=True, eq=False)
class FederatedDataset:
    """A federated training set plus a centralized held-out test set.

    Attributes:
      name: dataset name (the key in ``fedjax_kd.data.DATASETS``).
      train: the clients' training data: a padded :class:`ClientData` or a
        :class:`RaggedClientData` (heavy-tailed sizes), of NumPy arrays.
      test_x: ``[num_test, *feature_shape]`` centralized test features, of the
        training features' dtype (float32, uint8 pixels or int32 tokens).
      test_y: int32 ``[num_test]`` centralized test labels, or
        ``[num_test, T]`` per-position targets (next-token tasks: the
        training labels' shape; ``-1`` marks a position without a target).
      num_classes: number of classes; labels lie in ``[0, num_classes)``
        (next-token tasks: the vocabulary).
      proxy_x: optional ``[num_proxy, *feature_shape]`` unlabeled examples
        held by the server (FedDF-style distillation, public sets of FedMD /
        DS-FL), of the same dtype; disjoint from the clients' data and the
        test set.
      test_client: optional int32 ``[num_test]``: the test client each test
        example belongs to (datasets with per-client test data: LEAF, TFF,
        FedJAX files), for the per-client evaluation; None = a pooled test set.
      accuracy_ignore: target ids that accuracy does not count (next-token
        tasks: the out-of-vocabulary and end-of-sentence tokens, as the
        StackOverflow papers report accuracy); the loss still counts them.
    """

    name: str
    train: ClientData | RaggedClientData
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    proxy_x: np.ndarray | None = None
    test_client: np.ndarray | None = None
    accuracy_ignore: tuple[int, ...] = ()

    def __post_init__(self):
        """Checks dtypes and shapes so that a malformed dataset fails early."""
        try:
            ignore = tuple(int(t) for t in self.accuracy_ignore)
        except (TypeError, ValueError):
            raise ValueError(
                f"accuracy_ignore must be a sequence of target ids, got {self.accuracy_ignore!r}"
            ) from None
        object.__setattr__(self, "accuracy_ignore", ignore)  # frozen: a hashable tuple
        dtype = np.dtype(self.train.x.dtype)
        if dtype not in FEATURE_DTYPES:
            raise ValueError(f"train.x must be float32, uint8 or int32, got {dtype}.")
        if np.dtype(self.test_x.dtype) != dtype:
            raise ValueError(f"test_x must have train.x's dtype {dtype}, got {self.test_x.dtype}.")
        if self.train.y.dtype != np.int32 or self.test_y.dtype != np.int32:
            raise ValueError("train.y and test_y must be int32.")
        if tuple(self.test_x.shape[1:]) != self.feature_shape:
            raise ValueError(
                f"test_x feature shape {self.test_x.shape[1:]} != train {self.feature_shape}."
            )
        if self.test_x.shape[0] != self.test_y.shape[0]:
            raise ValueError("test_x and test_y have different lengths.")
        if tuple(self.test_y.shape[1:]) != self.target_shape or len(self.target_shape) > 1:
            raise ValueError(
                f"test_y must be [num_test] or [num_test, T] like the training labels "
                f"(per example {self.target_shape}), got {self.test_y.shape}."
            )
        if self.proxy_x is not None and (
            np.dtype(self.proxy_x.dtype) != dtype
            or tuple(self.proxy_x.shape[1:]) != self.feature_shape
        ):
            raise ValueError(f"proxy_x must be {dtype} with the training feature shape.")
        if self.test_client is not None and (
            np.dtype(self.test_client.dtype) != np.int32
            or self.test_client.shape != self.test_y.shape[:1]
            or (len(self.test_client) and self.test_client.min() < 0)
        ):
            raise ValueError("test_client must be int32 [num_test] client indices >= 0.")

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one example's features."""
        return self.train.feature_shape

    @property
    def num_clients(self) -> int:
        """Number of training clients."""
        return self.train.num_clients

    @property
    def target_shape(self) -> tuple[int, ...]:
        """Shape of one example's labels: ``()``, or ``(T,)`` per-position targets."""
        lead = 2 if isinstance(self.train, ClientData) else 1
        return tuple(self.train.y.shape[lead:])

    def label_counts(self) -> np.ndarray:
        """Per-client label histogram of the real training examples.

        Per-position targets count each real target position (labels ``>= 0``).

        Returns:
          int64 ``[num_clients, num_classes]``; row ``c`` sums to ``train.count[c]``
          (its number of real targets for per-position labels).
        """
        num_clients = self.num_clients
        if isinstance(self.train, RaggedClientData):
            y = np.asarray(self.train.y)
            client = np.repeat(np.arange(num_clients), np.asarray(self.train.count))
        else:
            mask = np.asarray(self.train.mask())
            y = np.asarray(self.train.y)[mask]
            client = np.broadcast_to(np.arange(num_clients)[:, None], mask.shape)[mask]
        if y.ndim > 1:  # per-position targets: every real position is one label
            client = np.broadcast_to(client[:, None], y.shape)[y >= 0]
            y = y[y >= 0]
        flat = client * self.num_classes + y
        counts = np.bincount(flat, minlength=num_clients * self.num_classes)
        return counts.reshape(num_clients, self.num_classes)
