"""Padded, stacked client data: the array layout every algorithm consumes.

A federated training set is held as one pytree of stacked arrays with a leading
client axis, so a round can ``vmap`` (or ``shard_map``) the local update over
the sampled clients without Python loops or ragged shapes:

* ``x``: float32 ``[C, N, *feature_shape]``
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
``jnp.asarray``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ClientData",
    "FederatedDataset",
    "gather_clients",
    "pack",
    "sample_clients",
]

Array = Any  # np.ndarray or jax.Array: the same container holds both.


class ClientData(NamedTuple):
    """Per-client examples stacked along a leading client axis, padded to ``N``.

    A NamedTuple, hence a pytree: it passes through ``jit``, ``vmap`` and
    ``jax.tree.map`` as is, and is rebuilt with ``._replace``.

    Attributes:
      x: float32 ``[C, N, *feature_shape]`` features; padded rows are zero.
      y: int32 ``[C, N]`` labels; padded entries are 0.
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
        n = self.y.shape[-1]
        return jnp.arange(n) < jnp.asarray(self.count)[..., None]

    @property
    def num_clients(self) -> int:
        """Number of clients ``C`` (the leading axis)."""
        return self.x.shape[0]

    @property
    def max_examples(self) -> int:
        """Padded per-client length ``N``."""
        return self.x.shape[1]


def pack(
    x: np.ndarray,
    y: np.ndarray,
    client_indices: Sequence[np.ndarray],
    *,
    pad_to: int | None = None,
    max_bytes: int = 8 * 2**30,
) -> ClientData:
    """Stacks per-client subsets of ``(x, y)`` into a padded :class:`ClientData`.

    Runs on the host in NumPy and returns NumPy arrays; move them to devices with
    ``jax.device_put`` when needed.

    Args:
      x: ``[num_examples, *feature_shape]`` features (any real dtype; cast to
        float32).
      y: ``[num_examples]`` integer labels (cast to int32).
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
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x must be [num_examples, ...] and y [num_examples]; got x {x.shape}, y {y.shape}."
        )
    indices = [np.asarray(idx, dtype=np.int64).reshape(-1) for idx in client_indices]
    counts = np.array([len(idx) for idx in indices], dtype=np.int32)
    max_size = int(counts.max(initial=0))
    n = max_size if pad_to is None else int(pad_to)
    if n < max_size:
        raise ValueError(f"pad_to={pad_to} is smaller than the largest client ({max_size}).")
    num_clients = len(indices)
    padded_bytes = num_clients * n * int(np.prod(x.shape[1:], dtype=np.int64)) * 4
    if padded_bytes > max_bytes:
        raise ValueError(
            f"padded client arrays would take {padded_bytes / 2**30:.1f} GiB ({num_clients} "
            f"clients x {n} examples, the largest client's size); cap the client sizes"
        )
    out_x = np.zeros((num_clients, n, *x.shape[1:]), dtype=np.float32)
    out_y = np.zeros((num_clients, n), dtype=np.int32)
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
      train: the clients' training data, a :class:`ClientData` of NumPy arrays.
      test_x: float32 ``[num_test, *feature_shape]`` centralized test features.
      test_y: int32 ``[num_test]`` centralized test labels.
      num_classes: number of classes; labels lie in ``[0, num_classes)``.
      proxy_x: optional float32 ``[num_proxy, *feature_shape]`` unlabeled
        examples held by the server (FedDF-style distillation, public sets of
        FedMD / DS-FL); disjoint from the clients' data and the test set.
    """

    name: str
    train: ClientData
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    proxy_x: np.ndarray | None = None

    def __post_init__(self):
        """Checks dtypes and shapes so that a malformed dataset fails early."""
        if self.train.x.dtype != np.float32 or self.test_x.dtype != np.float32:
            raise ValueError("train.x and test_x must be float32.")
        if self.train.y.dtype != np.int32 or self.test_y.dtype != np.int32:
            raise ValueError("train.y and test_y must be int32.")
        if tuple(self.test_x.shape[1:]) != self.feature_shape:
            raise ValueError(
                f"test_x feature shape {self.test_x.shape[1:]} != train {self.feature_shape}."
            )
        if self.test_x.shape[0] != self.test_y.shape[0]:
            raise ValueError("test_x and test_y have different lengths.")
        if self.proxy_x is not None and (
            self.proxy_x.dtype != np.float32 or tuple(self.proxy_x.shape[1:]) != self.feature_shape
        ):
            raise ValueError("proxy_x must be float32 with the training feature shape.")

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one example's features, ``train.x.shape[2:]``."""
        return tuple(self.train.x.shape[2:])

    @property
    def num_clients(self) -> int:
        """Number of training clients."""
        return self.train.num_clients

    def label_counts(self) -> np.ndarray:
        """Per-client label histogram of the real training examples.

        Returns:
          int64 ``[num_clients, num_classes]``; row ``c`` sums to ``train.count[c]``.
        """
        mask = np.asarray(self.train.mask())
        y = np.asarray(self.train.y)
        client = np.broadcast_to(np.arange(y.shape[0])[:, None], y.shape)
        flat = client[mask] * self.num_classes + y[mask]
        counts = np.bincount(flat, minlength=y.shape[0] * self.num_classes)
        return counts.reshape(y.shape[0], self.num_classes)
