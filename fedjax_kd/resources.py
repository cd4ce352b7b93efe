"""How much memory a run needs, from shapes alone, and how much the machine has.

A run that cannot fit should be refused before anything is compiled or
allocated, in one line with the numbers, rather than dying inside XLA minutes
later (or taking the machine down with it). :func:`estimate` derives a lower
bound from abstract shapes (``jax.eval_shape``: no array is allocated):

* ``state``: the algorithm's whole state, ``algorithm.init``'s output (the
  server model and its optimizer states, a teacher, per-client stores such as
  FedKD's mentors or FedMD's personal models);
* ``data``: the clients' arrays, the test set and the proxy set, which the
  run places on the device;
* ``cohort``: one chunk of the round's gathered clients, ``chunk x
  max_examples x features x 4`` bytes (+ labels: T each with per-position targets);
* ``clients``: what each client of a chunk trains at least, its own
  parameters and their gradient (``2 x`` the client model's bytes each).

Activations, optimizer moments inside local training and XLA's temporaries
come on top, so a run that passes may still be tight; one that fails would
not fit. :func:`available_memory` is the memory free now: the accelerator's
``memory_stats()`` when it has them, else the host's ``MemAvailable``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np


class Estimate(NamedTuple):
    """Bytes a run needs at least, by part (see the module docstring).

    Attributes:
      params: parameters of the client model (the largest of several groups).
      state: bytes of the algorithm's state.
      data: bytes of the clients', test and proxy arrays.
      cohort: bytes of one chunk of gathered client data.
      clients: bytes of the chunk's clients' parameters and gradients.
      schedule: bytes of the chunk's local-training schedule: every epoch's
        order of every client's examples (an int32 position and the float32
        draw that sorts it, per example and epoch).
      stacked: bytes of the round's K updates held at once (a robust
        aggregator or an attack that reads them), with as much again for the
        rule's sorting or distances: ``2 K x`` the model's float32 bytes, a
        lower bound; 0 for the running sum of FedAvg's mean.
    """

    params: int
    state: int
    data: int
    cohort: int
    clients: int
    schedule: int = 0
    stacked: int = 0

    @property
    def total(self) -> int:
        """All parts together."""
        parts = self.state + self.data + self.cohort + self.clients + self.schedule
        return parts + self.stacked


def tree_bytes(tree) -> int:
    """Bytes of a pytree of arrays or ``jax.ShapeDtypeStruct`` leaves (keys count 8 bytes)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        dtype = leaf.dtype
        itemsize = 8 if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else dtype.itemsize
        total += math.prod(leaf.shape) * itemsize
    return total


def tree_size(tree) -> int:
    """Number of scalars in a pytree of arrays or ``jax.ShapeDtypeStruct`` leaves."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def estimate(
    algorithm,
    dataset,
    *,
    client_models: Sequence,
    clients_per_round: int,
    client_chunk_size: int | None = None,
    max_local_examples: int | None = None,
    epochs: int = 1,
    init_key: jax.Array | None = None,
    stacked_updates: bool = False,
) -> Estimate:
    """The memory a run of ``algorithm`` on ``dataset`` needs at least, from shapes.

    Args:
      algorithm: the :class:`~fedjax_kd.types.FederatedAlgorithm`; its
        ``init`` is only traced (``jax.eval_shape``).
      dataset: the :class:`~fedjax_kd.data.FederatedDataset` (host arrays).
      client_models: the models clients train (one per architecture group);
        each ``init`` is only traced.
      clients_per_round: cohort size K.
      client_chunk_size: clients trained together (None: all K).
      max_local_examples: per-round cap on a client's examples (None: the largest client).
      epochs: local epochs (each client's schedule holds every epoch's order).
      init_key: the key ``init`` is traced with (default ``jax.random.key(0)``).
      stacked_updates: the round keeps its K updates at once (robust
        aggregation, :mod:`fedjax_kd.robust`).
    """
    key = jax.random.key(0) if init_key is None else init_key
    state = tree_bytes(jax.eval_shape(algorithm.init, key))
    params = max(tree_size(jax.eval_shape(m.init, key)) for m in client_models)
    train = dataset.train
    arrays = [train.x, train.y, dataset.test_x, dataset.test_y]
    if dataset.proxy_x is not None:
        arrays.append(dataset.proxy_x)
    data = sum(int(np.asarray(a).nbytes) for a in arrays)
    largest = int(train.max_examples)
    cap = largest if max_local_examples is None else min(max_local_examples, largest)
    chunk = min(client_chunk_size or clients_per_round, clients_per_round)
    features = math.prod(dataset.feature_shape)
    labels = math.prod(dataset.target_shape)  # 1, or T per-position targets
    cohort = chunk * max(cap, 1) * (features * 4 + 4 * labels + 1)  # x float32, y int32, mask
    clients = chunk * 2 * 4 * params  # each client's float32 params and their gradient
    schedule = chunk * max(epochs, 1) * max(cap, 1) * 8  # int32 order + float32 draw
    stacked = 2 * clients_per_round * 4 * params if stacked_updates else 0
    return Estimate(
        params=params,
        state=state,
        data=data,
        cohort=cohort,
        clients=clients,
        schedule=schedule,
        stacked=stacked,
    )


def available_memory(device=None) -> tuple[int | None, str]:
    """``(bytes, where)``: the memory free now for a run on ``device`` (default: the first).

    An accelerator that reports ``memory_stats()`` gives ``bytes_limit -
    bytes_in_use``; otherwise (CPU) the host's ``MemAvailable`` from
    ``/proc/meminfo``, else ``SC_PAGE_SIZE * SC_AVPHYS_PAGES``. ``bytes`` is
    None when nothing can be read.
    """
    device = jax.local_devices()[0] if device is None else device
    if device.platform != "cpu":
        try:
            stats = device.memory_stats() or {}
        except Exception:  # not every backend implements it
            stats = {}
        if "bytes_limit" in stats:
            free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
            return free, f"{device.platform.upper()} memory free on {device}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "RAM available"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "RAM available"
    except (ValueError, OSError, AttributeError):
        return None, "RAM available"


def format_bytes(n: float) -> str:
    """``1.2 GB``-style (powers of 1000), for one-line messages."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"
