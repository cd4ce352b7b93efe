"""Robust aggregation of client updates, and attacks by malicious clients.

The FedAvg family's server averages the cohort's updates as a running sum,
chunk by chunk, in memory that does not grow with the cohort. A robust
aggregator needs every update of the round at once: **the K updates, K x the
model's bytes**, and its sorting or distances about as much again
(``fedjax_kd.resources.estimate`` counts ``2 K`` model copies as ``stacked``,
a lower bound; a run whose estimate does not fit is refused before it
compiles). Each aggregator
is a pure function ``aggregate(deltas, weights) -> delta`` of the stacked
updates (a pytree of ``[K, ...]`` leaves) and their weights ``[K]`` (example
counts; a client of weight 0 -- no data, or padding -- takes no part), jit-
and vmap-compatible:

* ``mean``: the weighted mean (FedAvg).
* ``median``: the coordinate-wise median of the participating updates (Yin et
  al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
  Rates", ICML 2018, arXiv 1803.01498); the mean of the two middle values for
  an even count, as NumPy's.
* ``trimmed_mean``: per coordinate, the mean after dropping the
  ``floor(beta n)`` largest and smallest of the ``n`` participating values
  (Yin et al. 2018).
* ``krum`` / ``multi_krum``: Blanchard et al., "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017. Each
  update's score is the sum of squared distances to its ``n - f - 2``
  nearest other updates (``f`` the assumed attackers); Krum takes the update
  of the lowest score, Multi-Krum the weighted mean of the ``m`` lowest
  (ties: the lower cohort row first).
* ``norm_bound``: every update scaled to L2 norm at most ``M``, then the
  weighted mean (Sun et al., "Can You Really Backdoor Federated Learning?",
  arXiv 1911.07963).
* ``centered_clip``: ``v <- v + sum_k w_k clip_tau(x_k - v) / sum_k w_k``,
  ``iters`` times from ``v = 0`` (Karimireddy, He & Jaggi, "Learning from
  History for Byzantine Robust Optimization", ICML 2021, arXiv 2012.10333;
  the paper starts from the previous round's server momentum, this stateless
  version from zero, the update of no change).

Attacks (:func:`attack_deltas`) replace the uploads of the round's malicious
clients, ``round(fraction * K)`` of the cohort drawn from the round key:

* ``sign_flip``: ``-delta``; ``scale``: ``scale * delta``;
  ``noise``: ``N(0, noise_std^2)`` in place of the update;
* ``label_flip``: the client trains on labels ``C - 1 - y`` (data poisoning;
  applied before local training, :func:`flip_labels`);
* ``alie`` ("A Little Is Enough", Baruch, Baruch & Goldberg, NeurIPS 2019,
  arXiv 1902.06156): every attacker sends ``mu - z sigma``, the benign
  updates' coordinate-wise mean and standard deviation, with ``z`` from the
  paper: ``s = floor(n / 2 + 1) - f`` and ``z = Phi^-1((n - s) / n)``;
* ``ipm`` (inner-product manipulation, Xie, Koyejo & Gupta, UAI 2019, arXiv
  1903.03936): every attacker sends ``-epsilon mu``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_kd.aggregate import weighted_mean
from fedjax_kd.privacy import clip_update
from fedjax_kd.types import PyTree

#: The aggregators by ``server.aggregator`` name.
AGGREGATORS = (
    "mean",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "norm_bound",
    "centered_clip",
)
#: The attacks by ``attack.kind`` name (``none``: every client is honest).
ATTACKS = ("none", "sign_flip", "scale", "noise", "label_flip", "alie", "ipm")


def _participating(weights: jax.Array) -> jax.Array:
    return weights > 0


def _expand(mask: jax.Array, leaf: jax.Array) -> jax.Array:
    return mask.reshape(mask.shape + (1,) * (leaf.ndim - 1))


def _sorted_participants(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``x`` sorted along the client axis with non-participants (NaN) last."""
    return jnp.sort(jnp.where(_expand(mask, x), x, jnp.nan), axis=0)


def coordinate_median(deltas: PyTree, weights: jax.Array) -> PyTree:
    """The coordinate-wise median of the participating updates (0 when none)."""
    mask = _participating(weights)
    n = jnp.sum(mask)

    def one(x):
        s = _sorted_participants(x, mask)
        lo = jnp.take(s, jnp.maximum((n - 1) // 2, 0), axis=0)
        hi = jnp.take(s, jnp.maximum(n // 2, 0), axis=0)
        return jnp.where(n > 0, (lo + hi) / 2, 0.0).astype(x.dtype)

    return jax.tree.map(one, deltas)


def trimmed_mean(deltas: PyTree, weights: jax.Array, *, beta: float) -> PyTree:
    """Per coordinate, the mean of the participating values without the ``floor(beta n)``
    largest and smallest (0 when nothing is left)."""
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed_mean needs 0 <= beta < 0.5, got {beta}")
    mask = _participating(weights)
    n = jnp.sum(mask)
    b = jnp.floor(beta * n).astype(jnp.int32)

    def one(x):
        s = _sorted_participants(x, mask)
        rank = jnp.arange(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))
        keep = (rank >= b) & (rank < n - b)
        total = jnp.sum(jnp.where(keep, s, 0.0), axis=0)
        return (total / jnp.maximum(n - 2 * b, 1)).astype(x.dtype)

    return jax.tree.map(one, deltas)


def _flat(deltas: PyTree) -> jax.Array:
    """The updates as ``[K, D]`` rows (leaves flattened and concatenated)."""
    leaves = jax.tree.leaves(deltas)
    return jnp.concatenate([x.reshape(x.shape[0], -1) for x in leaves], axis=1)


def krum_scores(deltas: PyTree, weights: jax.Array, *, f: int) -> jax.Array:
    """Krum's score of each update: squared distances to its ``n - f - 2`` nearest others.

    Non-participants score ``+inf`` and are nobody's neighbour. With ``n <=
    f + 2`` participants there are no neighbours to sum and every participant
    scores 0 (the lowest row wins): Krum needs ``n > 2f + 2``, which the
    experiment layer requires of ``clients_per_round``. Distances come from
    the rows centred on the participants' mean (the same distances, without
    float32's cancellation of large norms).
    """
    mask = _participating(weights)
    x = jnp.where(mask[:, None], _flat(deltas), 0.0)
    centre = jnp.sum(x, axis=0) / jnp.maximum(jnp.sum(mask), 1)
    x = jnp.where(mask[:, None], x - centre, 0.0)
    sq = jnp.sum(x * x, axis=1)
    gram = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
    dist = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
    k = x.shape[0]
    others = mask[None, :] & mask[:, None] & ~jnp.eye(k, dtype=bool)
    dist = jnp.where(others, dist, jnp.inf)
    closest = jnp.sort(dist, axis=1)
    n = jnp.sum(mask)
    neighbours = jnp.maximum(n - f - 2, 0)
    take = jnp.arange(k)[None, :] < neighbours
    scores = jnp.sum(jnp.where(take, closest, 0.0), axis=1)
    return jnp.where(mask, scores, jnp.inf)


def multi_krum(deltas: PyTree, weights: jax.Array, *, f: int, m: int) -> PyTree:
    """The weighted mean of the ``m`` updates of lowest Krum score (``m = 1``: Krum)."""
    if f < 0 or m < 1:
        raise ValueError(f"multi_krum needs f >= 0 and m >= 1, got f={f}, m={m}")
    scores = krum_scores(deltas, weights, f=f)
    order = jnp.argsort(scores, stable=True)
    rank = jnp.empty_like(order).at[order].set(jnp.arange(order.shape[0]))
    chosen = (rank < m) & _participating(weights)
    return weighted_mean(deltas, jnp.where(chosen, weights, 0.0))


def _clip_rows(deltas: PyTree, bound: float) -> PyTree:
    """Every client's update (a row of the stacked leaves) clipped to L2 norm ``bound``."""
    return jax.vmap(lambda d: clip_update(d, bound)[0])(deltas)


def norm_bounded_mean(deltas: PyTree, weights: jax.Array, *, bound: float) -> PyTree:
    """Each update scaled to L2 norm ``<= bound``, then the weighted mean."""
    if bound <= 0:
        raise ValueError(f"norm_bound needs a bound > 0, got {bound}")
    return weighted_mean(_clip_rows(deltas, bound), weights)


def centered_clip(deltas: PyTree, weights: jax.Array, *, tau: float, iters: int) -> PyTree:
    """Centered clipping from ``v = 0``: ``iters`` steps of ``v += mean_w clip_tau(x_k - v)``."""
    if tau <= 0 or iters < 1:
        raise ValueError(f"centered_clip needs tau > 0 and iters >= 1, got {tau}, {iters}")
    v = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), deltas)
    for _ in range(iters):
        diff = jax.tree.map(lambda x, c: x - c[None], deltas, v)
        v = jax.tree.map(jnp.add, v, weighted_mean(_clip_rows(diff, tau), weights))
    return v


class Aggregator(NamedTuple):
    """A named aggregation rule: ``fn(deltas [K, ...], weights [K]) -> delta``.

    ``stacked`` is False only for ``mean`` without an attack that needs the
    round's updates: the FedAvg family then keeps its running sum.
    """

    name: str
    fn: Callable[[PyTree, jax.Array], PyTree]
    stacked: bool = True


def make_aggregator(
    name: str,
    *,
    trim_beta: float = 0.1,
    krum_f: int = 1,
    multi_krum_m: int = 0,
    norm_bound: float = 1.0,
    clip_tau: float = 1.0,
    clip_iters: int = 3,
) -> Aggregator:
    """The aggregator ``name`` (one of :data:`AGGREGATORS`) with its settings.

    ``multi_krum_m = 0`` means ``K - f`` (Blanchard et al.'s choice), resolved
    from the cohort at trace time.
    """
    if name == "mean":
        return Aggregator("mean", weighted_mean, stacked=False)
    if name == "median":
        return Aggregator(name, coordinate_median)
    if name == "trimmed_mean":
        if not 0.0 <= trim_beta < 0.5:
            raise ValueError(f"trimmed_mean needs 0 <= beta < 0.5, got {trim_beta}")
        return Aggregator(name, lambda d, w: trimmed_mean(d, w, beta=trim_beta))
    if name in ("krum", "multi_krum"):
        if krum_f < 0 or multi_krum_m < 0:
            raise ValueError(f"krum needs f >= 0 and m >= 0, got {krum_f}, {multi_krum_m}")

        def krum_fn(d, w):
            k = w.shape[0]
            m = 1 if name == "krum" else (multi_krum_m or max(k - krum_f, 1))
            return multi_krum(d, w, f=krum_f, m=m)

        return Aggregator(name, krum_fn)
    if name == "norm_bound":
        if norm_bound <= 0:
            raise ValueError(f"norm_bound needs a bound > 0, got {norm_bound}")
        return Aggregator(name, lambda d, w: norm_bounded_mean(d, w, bound=norm_bound))
    if name == "centered_clip":
        if clip_tau <= 0 or clip_iters < 1:
            raise ValueError(f"centered_clip needs tau > 0, iters >= 1: {clip_tau}, {clip_iters}")
        return Aggregator(name, lambda d, w: centered_clip(d, w, tau=clip_tau, iters=clip_iters))
    raise ValueError(f"unknown aggregator {name!r}; choose from {', '.join(AGGREGATORS)}")


# ----------------------------------------------------------------------------- attacks


class Attack(NamedTuple):
    """Malicious clients' behaviour in the FedAvg family's rounds.

    Attributes:
      kind: one of :data:`ATTACKS`.
      fraction: share of each round's cohort that is malicious
        (``round(fraction * K)`` clients, drawn per round).
      scale: the factor of ``scale``.
      noise_std: the standard deviation of ``noise``.
      epsilon: IPM's ``epsilon`` (attackers send ``-epsilon`` times the
        benign mean; 0.1 is this project's default).
      num_classes: the labels' range, for ``label_flip``.
    """

    kind: str = "none"
    fraction: float = 0.0
    scale: float = 10.0
    noise_std: float = 1.0
    epsilon: float = 0.1
    num_classes: int = 0

    @property
    def active(self) -> bool:
        """Whether any client misbehaves."""
        return self.kind != "none" and self.fraction > 0

    @property
    def updates_attacked(self) -> bool:
        """Whether malicious clients send other updates (label flipping poisons data only)."""
        return self.active and self.kind != "label_flip"


def keeps_updates(aggregator: Aggregator | None, attack: Attack | None) -> bool:
    """Whether a round keeps its K updates at once: a robust rule, or an attack on updates.

    Otherwise the FedAvg family's mean stays a running sum over chunks.
    """
    rule = aggregator is not None and aggregator.stacked
    return rule or (attack is not None and attack.updates_attacked)


def check_attack(attack: Attack) -> None:
    """Raises ValueError for attack settings that cannot be simulated."""
    if attack.kind not in ATTACKS:
        raise ValueError(f"unknown attack {attack.kind!r}; choose from {', '.join(ATTACKS)}")
    if not 0.0 <= attack.fraction < 1.0:
        raise ValueError(f"attack.fraction must be in [0, 1), got {attack.fraction}")
    if attack.kind == "noise" and attack.noise_std < 0:
        raise ValueError(f"attack.noise_std must be >= 0, got {attack.noise_std}")
    if attack.kind == "label_flip" and attack.num_classes < 2:
        raise ValueError("label_flip needs the number of classes")


def malicious_rows(key: jax.Array, num_clients: int, fraction: float) -> jax.Array:
    """Bool ``[K]``: exactly ``round(fraction * K)`` uniformly chosen cohort rows."""
    count = round(fraction * num_clients)
    rank = jnp.argsort(jax.random.permutation(key, num_clients))
    return rank < count


def flip_labels(y: jax.Array, num_classes: int) -> jax.Array:
    """``C - 1 - y`` for real labels; no-target positions (``< 0``) stay."""
    return jnp.where(y >= 0, num_classes - 1 - y, y)


def alie_z(num_clients: int, num_malicious: int) -> float:
    """ALIE's ``z``: ``s = floor(n/2 + 1) - f``, ``z = Phi^-1((n - s) / n)`` (Baruch et al.)."""
    from statistics import NormalDist

    n, f = num_clients, num_malicious
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0.0 < p < 1.0:
        return 0.0
    return NormalDist().inv_cdf(p)


def attack_deltas(
    attack: Attack, deltas: PyTree, weights: jax.Array, malicious: jax.Array, key: jax.Array
) -> PyTree:
    """The uploads of a round with ``malicious`` rows attacking (stacked ``[K, ...]``).

    ``label_flip`` changes nothing here (it poisons the training data). The
    benign statistics of ALIE and IPM are over the participating honest
    clients (weight > 0).
    """
    if not attack.updates_attacked:
        return deltas
    bad = lambda x: _expand(malicious, x)  # noqa: E731
    if attack.kind == "sign_flip":
        return jax.tree.map(lambda x: jnp.where(bad(x), -x, x), deltas)
    if attack.kind == "scale":
        return jax.tree.map(lambda x: jnp.where(bad(x), attack.scale * x, x), deltas)
    if attack.kind == "noise":
        leaves, tree = jax.tree.flatten(deltas)
        keys = jax.random.split(key, len(leaves))
        noisy = [
            jnp.where(bad(x), attack.noise_std * jax.random.normal(k, x.shape, x.dtype), x)
            for x, k in zip(leaves, keys, strict=True)
        ]
        return jax.tree.unflatten(tree, noisy)
    honest = _participating(weights) & ~malicious
    h = honest.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(h), 1.0)

    def mean_std(x):
        hx = _expand(h, x)
        mu = jnp.sum(hx * x, axis=0) / count
        var = jnp.sum(hx * (x - mu) ** 2, axis=0) / count
        return mu, jnp.sqrt(var)

    if attack.kind == "ipm":
        return jax.tree.map(
            lambda x: jnp.where(bad(x), -attack.epsilon * mean_std(x)[0], x), deltas
        )
    # ALIE: n and f are static (the cohort size and the attackers' count).
    k = weights.shape[0]
    z = alie_z(k, round(attack.fraction * k))

    def alie(x):
        mu, sigma = mean_std(x)
        return jnp.where(bad(x), mu - z * sigma, x)

    return jax.tree.map(alie, deltas)
