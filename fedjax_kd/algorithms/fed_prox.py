"""FedProx: FedAvg with a proximal term in the local objective.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
arXiv 1812.06127. Each client minimises

    F_k(w) + (mu / 2) * ||w - w_global||^2

starting from ``w_global``; the server side is FedAvg's (any server optimizer).
With ``mu = 0`` this is exactly FedAvg. Communication is FedAvg's.
"""

from __future__ import annotations

import optax

from fedjax_kd.algorithms.fed_avg import from_client_update
from fedjax_kd.client import make_client_update
from fedjax_kd.spec import AlgorithmSpec, BuildContext, Hyper, at_least
from fedjax_kd.types import FederatedAlgorithm


def fed_prox(
    model,
    *,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    mu: float,
    uniform_weighting: bool = False,
    straggler_fraction: float = 0.0,
    drop_stragglers: bool = False,
    **options,
) -> FederatedAlgorithm:
    """Builds FedProx with proximal weight ``mu >= 0``.

    Other arguments (stragglers, and in ``options`` ``aggregator``,
    ``attack``, ``dp``, ``drop_nonfinite``, ``quantize_bits``, ``poisson``)
    are those of :func:`fedjax_kd.algorithms.fed_avg`; the paper's FedProx
    keeps stragglers' partial work (``drop_stragglers=False``).
    """
    if mu < 0:
        raise ValueError(f"FedProx mu must be >= 0, got {mu}")
    client_update = make_client_update(
        model.apply, client_optimizer, epochs=epochs, batch_size=batch_size, prox_mu=mu
    )
    return from_client_update(
        model,
        client_update,
        server_optimizer,
        uniform_weighting=uniform_weighting,
        epochs=epochs,
        straggler_fraction=straggler_fraction,
        drop_stragglers=drop_stragglers,
        **options,
    )


def _build(ctx: BuildContext) -> FederatedAlgorithm:
    return fed_prox(ctx.student, mu=ctx.hp["mu"], **ctx.stragglers, **ctx.common, **ctx.robust)


#: How the experiment layer builds FedProx (``algorithm.name=fedprox``, keys ``fedprox.*``).
SPEC = AlgorithmSpec(
    name="fedprox",
    renamed={"algorithm.mu": "mu"},
    help="FedProx (Li et al. 2020): FedAvg plus a proximal term; stragglers' partial work",
    build=_build,
    hypers={"mu": Hyper(0.01, "proximal weight mu of (mu/2) ||w - w_global||^2", **at_least(0))},
    stragglers=True,
    robust=True,
)
