"""User-level differential privacy for the FedAvg family (DP-FedAvg) and its accounting.

DP-FedAvg (McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private
Recurrent Language Models", ICLR 2018, arXiv 1710.06963), with a fixed
denominator: each sampled client's update is clipped to L2 norm at most
``S`` (``clip_norm``), the server adds Gaussian noise of standard deviation
``z S`` (``noise_multiplier``) once per round to the *sum* of the clipped
updates and divides by the cohort size ``K``:

    delta = (sum_k clip_S(delta_k) + N(0, (z S)^2 I)) / K

Every client counts once, whatever its number of examples (uniform
weighting); a client without data (or a dropped straggler) contributes a
zero update and still counts in ``K``. Clipping happens per client inside
its chunk and the noise once on the summed chunks, so chunked cohorts of any
size run in the same bounded memory as plain FedAvg.

Accounting (:func:`epsilon`) uses Google's ``dp-accounting`` package for the
sampling this simulator actually performs: a fixed-size cohort of ``K`` of
the ``N`` clients drawn uniformly *without replacement* every round
(``fedjax_kd.data.sample_clients``), under the **replace-one** neighbouring
relation (a dataset differs in one client's data), with the RDP accountant:
dp-accounting's PLD accountant does not support sampling without
replacement, so no PLD value is reported for it. Replacing one client
changes the sum of clipped updates by up to ``2 S`` (``||a - b|| <= 2 S``),
while dp-accounting's Gaussian event counts its noise multiplier against a
sensitivity of ``S`` (at ``K = N`` its replace-one RDP is ``alpha / (2
z^2)``, the add/remove value; google/differential-privacy issue 378), so the
event is ``SampledWithoutReplacementDpEvent(N, K, GaussianDpEvent(z / 2))``:
the noise measured against the replace-one sensitivity.

The epsilon covers what the server releases, the model updates; the
simulator's own metrics (``train_loss``, ``dp_clipped_fraction``, the
accuracies) are not privatised.
Poisson sampling (add/remove-one, RDP and PLD) and adaptive clipping are not
implemented yet.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_kd.types import PyTree


class DP(NamedTuple):
    """DP-FedAvg's settings.

    Attributes:
      clip_norm: the L2 bound ``S`` of every client's update (> 0).
      noise_multiplier: ``z``: the noise's std is ``z S`` on the sum (>= 0;
        0 clips without noise, which gives no privacy).
      delta: the ``delta`` of the reported ``(epsilon, delta)``.
    """

    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5


def check_dp(dp: DP) -> None:
    """Raises ValueError for settings DP-FedAvg cannot use."""
    if dp.clip_norm <= 0:
        raise ValueError(f"dp.clip_norm must be > 0, got {dp.clip_norm}")
    if dp.noise_multiplier < 0:
        raise ValueError(f"dp.noise_multiplier must be >= 0, got {dp.noise_multiplier}")
    if not 0 < dp.delta < 1:
        raise ValueError(f"dp.delta must be in (0, 1), got {dp.delta}")


def global_norm(tree: PyTree) -> jax.Array:
    """The L2 norm of all leaves of ``tree`` together."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def clip_update(delta: PyTree, clip_norm: float) -> tuple[PyTree, jax.Array]:
    """``delta * min(1, S / ||delta||)`` and ``||delta||`` (one client's update)."""
    norm = global_norm(delta)
    factor = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
    return jax.tree.map(lambda x: x * factor.astype(x.dtype), delta), norm


def noised_mean(total: PyTree, key: jax.Array, dp: DP, cohort_size: int) -> PyTree:
    """``(total + N(0, (z S)^2 I)) / K``: the server's private aggregate of clipped updates."""
    leaves, tree = jax.tree.flatten(total)
    keys = jax.random.split(key, len(leaves))
    std = dp.noise_multiplier * dp.clip_norm
    noisy = [
        (x + std * jax.random.normal(k, x.shape, x.dtype)) / cohort_size
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, noisy)


def round_event(num_clients: int, cohort_size: int, noise_multiplier: float):
    """One round's ``dp_accounting`` event: ``K`` of ``N`` without replacement, noise ``z / 2``.

    ``z / 2``: the noise's std ``z S`` measured against the replace-one
    sensitivity ``2 S`` of the sum of clipped updates (module docstring).
    """
    import dp_accounting

    return dp_accounting.SampledWithoutReplacementDpEvent(
        num_clients, cohort_size, dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    )


@functools.lru_cache(maxsize=256)
def _one_round_rdp(num_clients: int, cohort_size: int, noise_multiplier: float):
    """The RDP orders and one round's RDP values (the accountant's, computed once)."""
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    accountant.compose(round_event(num_clients, cohort_size, noise_multiplier))
    return tuple(accountant._orders), tuple(float(v) for v in accountant._rdp)


@functools.lru_cache(maxsize=4096)
def epsilon(
    num_clients: int, cohort_size: int, noise_multiplier: float, rounds: int, delta: float
) -> float:
    """``epsilon`` after ``rounds`` rounds of DP-FedAvg with fixed-size sampling (RDP).

    The RDP of :func:`round_event` composed ``rounds`` times (RDP adds up over
    rounds), under replace-one adjacency, converted to ``(epsilon, delta)`` by
    dp-accounting's ``compute_epsilon``; ``inf`` without noise, 0 before the
    first round.
    """
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    from dp_accounting.rdp import rdp_privacy_accountant

    orders, rdp = _one_round_rdp(num_clients, cohort_size, noise_multiplier)
    eps, _ = rdp_privacy_accountant.compute_epsilon(orders, [rounds * v for v in rdp], delta)
    return float(eps)


def rounds_within(
    budget: float, num_clients: int, cohort_size: int, noise_multiplier: float, delta: float
) -> int:
    """The most rounds whose ``epsilon`` stays at or below ``budget`` (binary search)."""
    if epsilon(num_clients, cohort_size, noise_multiplier, 1, delta) > budget:
        return 0
    lo, hi = 1, 2
    while epsilon(num_clients, cohort_size, noise_multiplier, hi, delta) <= budget:
        lo, hi = hi, hi * 2
        if hi > 2**31:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if epsilon(num_clients, cohort_size, noise_multiplier, mid, delta) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def host_metrics(dp: DP, num_clients: int, cohort_size: int):
    """``round -> {"dp_epsilon": ..., "dp_delta": ...}`` for the run's records.

    ``dp_epsilon`` is None (JSON null) without noise: no finite epsilon holds.
    """

    def metrics(round_: int) -> dict:
        eps = epsilon(num_clients, cohort_size, dp.noise_multiplier, round_, dp.delta)
        # Without noise epsilon is infinite: null in JSON (Infinity is not JSON).
        return {"dp_epsilon": None if eps == float("inf") else eps, "dp_delta": dp.delta}

    return metrics
