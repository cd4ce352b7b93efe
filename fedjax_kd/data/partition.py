"""Partitioners: split a centralized labelled dataset among simulated clients.

Every partitioner takes the label vector and returns a list of ``num_clients``
sorted int64 index arrays such that every index in ``range(len(labels))`` lands
in exactly one client. They are deterministic in ``seed``
(``np.random.default_rng(seed)``) and never touch the features, so the same
partition can be applied to any view of the data.

* :func:`iid`: a uniform random split into near-equal parts.
* :func:`dirichlet`: label skew. For each class ``k``, proportions
  ``p_k ~ Dir(alpha * 1_C)`` split the class's examples among the ``C`` clients.
  Introduced by Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification" (arXiv 1909.06335); the
  per-class recipe here is the one of NIID-Bench (Li et al., "Federated Learning
  on Non-IID Data Silos: An Experimental Study", arXiv 2102.02079, code
  ``Xtra-Computing/NIID-Bench``) and FedDF (Lin et al., arXiv 2006.07242),
  including NIID-Bench's balancing step (a client that already holds
  ``>= len(labels) / C`` examples gets no share of the next classes; switch off
  with ``balance=False``). Smaller ``alpha`` means more skew.
* :func:`shards`: the "pathological non-IID" split of McMahan et al.,
  "Communication-Efficient Learning of Deep Networks from Decentralized Data"
  (AISTATS 2017, arXiv 1602.05629): sort by label, cut into
  ``C * shards_per_client`` shards, deal ``shards_per_client`` random shards to
  each client. Deviation: shards are cut *within* classes (see :func:`shards`),
  so no shard mixes two labels and a client has at most ``shards_per_client``
  labels, which McMahan's contiguous cut only gives when class sizes are
  multiples of the shard size.
* :func:`quantity`: quantity skew. Client sizes are proportional to
  ``lognormal(0, sigma)`` draws (on top of a guaranteed minimum), examples are
  assigned uniformly at random, so label distributions stay near-IID.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PARTITIONERS", "dirichlet", "iid", "quantity", "shards"]


def _count(value, name: str, minimum: int) -> None:
    """Raises ValueError unless ``value`` is an integer (not a float, not bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")


def _check(labels, num_clients: int) -> np.ndarray:
    """Validates the common arguments and returns ``labels`` as a 1-D array."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D; got shape {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers; got dtype {labels.dtype}.")
    _count(num_clients, "num_clients", 1)
    if num_clients > len(labels):
        raise ValueError(
            f"num_clients={num_clients} exceeds the number of examples ({len(labels)})."
        )
    return labels


def _check_min_size(min_size: int, num_clients: int, num_examples: int) -> None:
    _count(min_size, "min_size", 0)
    if min_size * num_clients > num_examples:
        raise ValueError(
            f"min_size * num_clients = {min_size} * {num_clients} exceeds the "
            f"number of examples ({num_examples})."
        )


def _finalize(parts) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _split_sizes(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer sizes summing to ``total``, proportional to ``weights``.

    Largest-remainder rounding; ties go to the lower index, so it is deterministic.
    """
    quota = weights / weights.sum() * total
    sizes = np.floor(quota).astype(np.int64)
    leftover = total - int(sizes.sum())
    order = np.argsort(-(quota - sizes), kind="stable")
    sizes[order[:leftover]] += 1
    return sizes


def iid(labels, num_clients: int, *, seed: int) -> list[np.ndarray]:
    """Uniform random split into ``num_clients`` parts whose sizes differ by <= 1.

    Args:
      labels: int ``[num_examples]`` labels (only the length is used).
      num_clients: number of clients, ``1 <= num_clients <= num_examples``.
      seed: seed of ``np.random.default_rng``.

    Returns:
      ``num_clients`` sorted int64 index arrays partitioning ``range(num_examples)``.
    """
    labels = _check(labels, num_clients)
    rng = np.random.default_rng(seed)
    return _finalize(np.array_split(rng.permutation(len(labels)), num_clients))


def dirichlet(
    labels,
    num_clients: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 2,
    balance: bool = True,
    max_resamples: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided among clients by ``Dir(alpha)``.

    For each class (in sorted label order) the class's shuffled examples are cut
    at ``floor(cumsum(p) * n_k)`` with ``p ~ Dir(alpha * 1_C)``. With
    ``balance=True`` (NIID-Bench/FedDF), clients already holding at least
    ``num_examples / num_clients`` examples get ``p = 0`` for later classes,
    which keeps client sizes from exploding at small ``alpha``.

    Minimum size: NIID-Bench resamples the whole partition until every client
    holds ``>= min_size`` examples, which may never happen for small ``alpha``
    and many clients. Here at most ``max_resamples`` draws are made (the first
    that satisfies the minimum is returned, exactly as in NIID-Bench); if none
    does, the last draw is topped up deterministically: each client below
    ``min_size``, in client order, receives examples one at a time from the
    currently largest client (lowest index on ties), taking that client's most
    recently assigned example. The top-up always terminates because
    ``min_size * num_clients <= num_examples`` guarantees a donor holding more
    than ``min_size``. It moves few examples, but they can carry labels that
    the receiving client would otherwise not have.

    Args:
      labels: int ``[num_examples]`` labels.
      num_clients: number of clients.
      alpha: Dirichlet concentration, ``> 0``; small is skewed (0.1), large is
        near-IID (100).
      seed: seed of ``np.random.default_rng``.
      min_size: minimum examples per client (NIID-Bench uses 10; 2 keeps the
        skew of small datasets such as sklearn digits mostly intact).
      balance: apply NIID-Bench's balancing step (see above).
      max_resamples: number of draws before falling back to the top-up.

    Returns:
      ``num_clients`` sorted int64 index arrays partitioning ``range(num_examples)``.

    Raises:
      ValueError: on ``alpha`` not finite and > 0, ``min_size * num_clients > num_examples``,
        ``max_resamples < 1`` or invalid common arguments.
    """
    labels = _check(labels, num_clients)
    if not 0 < alpha < float("inf"):
        raise ValueError(f"alpha must be finite and > 0; got {alpha}.")
    _count(max_resamples, "max_resamples", 1)
    n = len(labels)
    _check_min_size(min_size, num_clients, n)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == k) for k in classes]

    for _ in range(max_resamples):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx_k in by_class:
            idx_k = rng.permutation(idx_k)
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            if balance:
                p = p * (sizes < n / num_clients)
            if p.sum() <= 0:
                # All mass underflowed onto full clients (possible for tiny alpha):
                # fall back to a uniform share among the clients still open.
                p = (sizes < n / num_clients).astype(np.float64) if balance else np.ones_like(p)
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx_k)).astype(np.int64)[:-1]
            for c, chunk in enumerate(np.split(idx_k, cuts)):
                parts[c].extend(chunk.tolist())
                sizes[c] += len(chunk)
        if sizes.min() >= min_size:
            return _finalize(parts)

    for c in range(num_clients):
        while len(parts[c]) < min_size:
            donor = int(np.argmax([len(q) for q in parts]))
            parts[c].append(parts[donor].pop())
    return _finalize(parts)


def _shards_per_class(class_sizes: np.ndarray, num_shards: int) -> np.ndarray:
    """Shard counts per class: >= 1 each, <= class size, ~ proportional, sum num_shards."""
    quota = class_sizes / class_sizes.sum() * num_shards
    counts = np.clip(np.floor(quota).astype(np.int64), 1, class_sizes)
    # Greedy largest-remainder correction; |num_shards - counts.sum()| is at most
    # about the number of classes, so this loop is short.
    while counts.sum() < num_shards:
        gap = np.where(counts < class_sizes, quota - counts, -np.inf)
        counts[int(np.argmax(gap))] += 1
    while counts.sum() > num_shards:
        gap = np.where(counts > 1, quota - counts, np.inf)
        counts[int(np.argmin(gap))] -= 1
    return counts


def shards(labels, num_clients: int, *, seed: int, shards_per_client: int = 2) -> list[np.ndarray]:
    """McMahan et al. (2017) pathological non-IID split, with single-label shards.

    The ``S = num_clients * shards_per_client`` shards are allotted to classes in
    proportion to class size (largest remainder, at least one shard per class,
    at most one shard per example), each class's examples are shuffled and cut
    into that many near-equal contiguous shards, and the shards are dealt to
    clients in a random order, ``shards_per_client`` each.

    Guarantee: every shard holds exactly one label, so every client holds at
    most ``shards_per_client`` distinct labels. When every class size is a
    multiple of ``num_examples / S`` this is exactly McMahan's split (sorting by
    label with random tie order, equal contiguous shards). Otherwise shard sizes
    differ slightly between classes instead of some shards straddling two
    labels, which in McMahan's version can give a client up to
    ``2 * shards_per_client`` labels.

    Args:
      labels: int ``[num_examples]`` labels.
      num_clients: number of clients.
      seed: seed of ``np.random.default_rng``.
      shards_per_client: shards per client (McMahan: 2).

    Returns:
      ``num_clients`` sorted int64 index arrays partitioning ``range(num_examples)``.

    Raises:
      ValueError: if ``shards_per_client < 1``, if there are fewer shards than
        distinct labels (a label would have no shard), or more shards than
        examples.
    """
    labels = _check(labels, num_clients)
    _count(shards_per_client, "shards_per_client", 1)
    num_shards = num_clients * shards_per_client
    classes, class_sizes = np.unique(labels, return_counts=True)
    if num_shards < len(classes):
        raise ValueError(
            f"num_clients * shards_per_client = {num_shards} shards cannot cover "
            f"{len(classes)} labels with single-label shards; use more clients or shards."
        )
    if num_shards > len(labels):
        raise ValueError(f"{num_shards} shards exceed the number of examples ({len(labels)}).")
    rng = np.random.default_rng(seed)
    per_class = _shards_per_class(class_sizes, num_shards)
    all_shards = []
    for k, n_k in zip(classes, per_class, strict=True):
        idx_k = rng.permutation(np.flatnonzero(labels == k))
        all_shards.extend(np.array_split(idx_k, n_k))
    order = rng.permutation(num_shards)
    return _finalize(
        np.concatenate([all_shards[s] for s in order[c::num_clients]]) for c in range(num_clients)
    )


def quantity(
    labels, num_clients: int, *, seed: int, sigma: float = 1.0, min_size: int = 2
) -> list[np.ndarray]:
    """Quantity-skewed split: lognormal client sizes, IID labels.

    Sizes are ``min_size + r_c`` where the remaining ``num_examples - C * min_size``
    examples are divided in proportion to ``w_c ~ lognormal(0, sigma)``
    (largest-remainder rounding). Examples are then dealt uniformly at random.

    Args:
      labels: int ``[num_examples]`` labels (only the length is used).
      num_clients: number of clients.
      seed: seed of ``np.random.default_rng``.
      sigma: log-space standard deviation; 0 gives near-equal sizes.
      min_size: guaranteed minimum examples per client.

    Returns:
      ``num_clients`` sorted int64 index arrays partitioning ``range(num_examples)``.

    Raises:
      ValueError: on ``sigma`` not finite and >= 0, ``min_size * num_clients > num_examples`` or
        invalid common arguments.
    """
    labels = _check(labels, num_clients)
    if not 0 <= sigma < float("inf"):
        raise ValueError(f"sigma must be finite and >= 0; got {sigma}.")
    n = len(labels)
    _check_min_size(min_size, num_clients, n)
    rng = np.random.default_rng(seed)
    # exp(z - max z) instead of lognormal(0, sigma): same proportions, no overflow.
    z = rng.normal(0.0, sigma, num_clients)
    weights = np.exp(z - z.max())
    sizes = min_size + _split_sizes(weights, n - min_size * num_clients)
    cuts = np.cumsum(sizes)[:-1]
    return _finalize(np.split(rng.permutation(n), cuts))


PARTITIONERS = {"iid": iid, "dirichlet": dirichlet, "shards": shards, "quantity": quantity}
"""Partitioners by name, as used in configs: ``PARTITIONERS[name](labels, C, seed=...)``."""
