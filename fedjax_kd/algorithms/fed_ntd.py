"""FedNTD: FedAvg whose clients distil the global model's not-true logits.

Lee et al., "Preservation of the Global Knowledge by Not-True Distillation in
Federated Learning", NeurIPS 2022, arXiv 2106.03097. Client ``k`` minimises,
per example,

    CE(z, y) + beta * tau^2 * KL(softmax(z~_g / tau) || softmax(z~ / tau))

where ``z~`` drops the true-class logit (C - 1 not-true classes) and ``z_g``
are the logits of the downloaded global model, frozen (no gradient). The KL is
averaged over the batch's real examples (PyTorch ``batchmean``), as in the
official code (``NTD_Loss``). Defaults follow the official config: ``tau = 1``,
``beta = 1``. The server is FedAvg's (any server optimizer); with ``beta = 0``
FedNTD is exactly FedAvg.

Communication: FedAvg's (params down, delta + weight up). Compute: one extra
forward pass of the global model over each client's examples per round (the
targets are computed once per round, not once per step).
"""

from __future__ import annotations

import functools

import optax

from fedjax_kd import losses
from fedjax_kd.algorithms.fed_avg import from_client_update
from fedjax_kd.client import batched_apply, make_client_update
from fedjax_kd.spec import AlgorithmSpec, BuildContext, Hyper, at_least, positive
from fedjax_kd.types import FederatedAlgorithm


def ntd_distill_fn(tau: float):
    """``distill_fn`` for :func:`~fedjax_kd.client.make_client_update`: not-true KL."""

    def distill(student_logits, teacher_logits, labels):
        return losses.not_true_distillation_loss(student_logits, teacher_logits, labels, tau)

    return distill


def fed_ntd(
    model,
    *,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    beta: float = 1.0,
    tau: float = 1.0,
    uniform_weighting: bool = False,
    straggler_fraction: float = 0.0,
    drop_stragglers: bool = False,
    **options,
) -> FederatedAlgorithm:
    """Builds FedNTD.

    Args:
      model: the global model (pure ``init``/``apply``).
      client_optimizer: optax optimizer for local training.
      server_optimizer: optax optimizer on the pseudo-gradient.
      epochs: local epochs per round.
      batch_size: local minibatch size.
      beta: weight of the not-true distillation term (>= 0; 0 = FedAvg).
      tau: distillation temperature (> 0).
      uniform_weighting: average deltas uniformly instead of by example count.
      straggler_fraction: fraction of each cohort that are stragglers.
      drop_stragglers: drop stragglers instead of keeping their partial work.
      **options: ``aggregator``, ``attack``, ``dp``, ``drop_nonfinite``,
        ``quantize_bits``, ``poisson`` (robust aggregation, malicious clients,
        DP-FedAvg, dropping non-finite updates, uplink quantization, Poisson
        sampling), as for :func:`fedjax_kd.algorithms.fed_avg`.
    """
    if beta < 0 or tau <= 0:
        raise ValueError(f"FedNTD needs beta >= 0 and tau > 0, got beta={beta}, tau={tau}")
    client_update = make_client_update(
        model.apply,
        client_optimizer,
        epochs=epochs,
        batch_size=batch_size,
        kd_weight=beta,
        distill_fn=ntd_distill_fn(tau),
    )
    return from_client_update(
        model,
        client_update,
        server_optimizer,
        uniform_weighting=uniform_weighting,
        targets_fn=functools.partial(batched_apply, model.apply, batch_size=batch_size)
        if beta > 0
        else None,
        epochs=epochs,
        straggler_fraction=straggler_fraction,
        drop_stragglers=drop_stragglers,
        **options,
    )


def _build(ctx: BuildContext) -> FederatedAlgorithm:
    return fed_ntd(
        ctx.student,
        beta=ctx.hp["beta"],
        tau=ctx.hp["temperature"],
        **ctx.stragglers,
        **ctx.common,
        **ctx.robust,
    )


#: How the experiment layer builds FedNTD (``algorithm.name=fedntd``, keys ``fedntd.*``).
SPEC = AlgorithmSpec(
    name="fedntd",
    renamed={"algorithm.ntd_beta": "beta", "algorithm.ntd_tau": "temperature"},
    help="FedNTD (Lee et al. 2022): not-true distillation from the downloaded global model",
    build=_build,
    hypers={
        "beta": Hyper(1.0, "weight beta of the not-true distillation term", **at_least(0)),
        "temperature": Hyper(1.0, "distillation temperature tau", **positive()),
    },
    stragglers=True,
    robust=True,
)
