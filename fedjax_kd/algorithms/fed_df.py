"""FedDF: FedAvg followed by server-side ensemble distillation, heterogeneous models.

Lin et al., "Ensemble Distillation for Robust Model Fusion in Federated
Learning", NeurIPS 2020, arXiv 2006.07242. Each round:

1. Client ``k`` of architecture group ``g`` trains the group's model as in
   FedAvg and sends its delta.
2. Within each group: ``w_g <- ServerOpt(w_g, sum_{k in g} (n_k/n_g) delta_k)``
   (FedAvg initialisation of the fused model).
3. Each group's model is distilled from the ensemble of ALL cohort clients
   (every group's local models) on the server's unlabeled proxy set: target
   ``softmax(mean_k z_k / T)`` ("AVGLOGITS"), loss ``T^2 KL(target || softmax(z_g / T))``
   with ``batchmean`` reduction, ``distill_steps`` steps of ``distill_optimizer``
   (FedDF: Adam lr 1e-3, batch 128, clip 5, T = 1).

Deviation from the paper: FedDF early-stops distillation on a labeled server
validation set; we run a fixed ``distill_steps`` (no server labels). With
``distill_steps = 0`` and one group FedDF is exactly FedAvg.

Heterogeneous architectures: client ``i`` has the architecture of group
``i % G``; each round samples ``K / G`` clients per group
(:func:`fedjax_kd.cohort.sample_by_group`), so every group's sub-cohort has a
static shape and the round compiles once.

Privacy (one architecture group only; Sources: ``shared/REFERENCES_NEXT.md``
A4, "DP for output sharing and distillation", consequences 1-2): ``dp``
makes the deltas DP-FedAvg's (:func:`~fedjax_kd.algorithms.fed_avg.fedavg_step`,
noise from the stream ``fed_avg.DP_STREAM``, metric ``dp_clipped_fraction``);
``output_dp`` privatizes the ensemble: each client's ``[P, C]`` logits block
on the whole proxy set is clipped to Frobenius norm ``output_dp.clip_norm``
(:func:`fedjax_kd.aggregate.ensemble_contribution`; a client without data
or a dropped straggler uploads zeros), ``N(0, (z S)^2)`` is added once to the
cohort's sum (stream ``aggregate.OUTPUT_DP_STREAM``) and the sum is divided
by the cohort size ``K`` (metric ``dp_output_clipped_fraction``). The
distillation on that target is post-processing. Each protects one release:
a private run needs both.

Communication per client: its group's params down, its delta and weight up.
Server compute added over FedAvg: ``K * P`` forward passes for the ensemble
logits on the ``P`` proxy examples (``server_forward_examples``) and
``G * distill_steps`` distillation steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_kd import aggregate, cohort, distill, privacy
from fedjax_kd.algorithms.fed_avg import (
    DP_STREAM,
    STRAGGLER_STREAM,
    check_stragglers,
    client_inputs,
    fedavg_step,
)
from fedjax_kd.client import make_client_update
from fedjax_kd.data.federated import check_cohort
from fedjax_kd.spec import AlgorithmSpec, BuildContext, with_server_distillation
from fedjax_kd.types import FederatedAlgorithm, PyTree


class FedDFState(NamedTuple):
    """Server state of :func:`fed_df`: one entry per architecture group.

    Attributes:
      params: tuple of each group's global params.
      opt_state: tuple of each group's server optimizer state.
    """

    params: tuple
    opt_state: tuple


def fed_df(
    models: Sequence,
    *,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    distill_optimizer: optax.GradientTransformation | None = None,
    distill_steps: int = 100,
    distill_batch_size: int = 128,
    temperature: float = 1.0,
    uniform_weighting: bool = False,
    straggler_fraction: float = 0.0,
    drop_stragglers: bool = False,
    dp: privacy.DP | None = None,
    output_dp: privacy.DP | None = None,
) -> FederatedAlgorithm:
    """Builds FedDF for one or more architecture groups.

    Args:
      models: one model per architecture group (length 1 = homogeneous FedDF).
      client_optimizer: optax optimizer for local training.
      server_optimizer: optax optimizer on each group's pseudo-gradient.
      epochs: local epochs per round (FedDF gains need long local training).
      batch_size: local minibatch size.
      distill_optimizer: optimizer of the server distillation (default:
        clip global norm 5, then Adam lr 1e-3).
      distill_steps: server distillation steps per group and round.
      distill_batch_size: proxy minibatch size.
      temperature: ensemble distillation temperature.
      uniform_weighting: average deltas uniformly within a group.
      straggler_fraction: fraction of each cohort that are stragglers (FedProx's
        systems heterogeneity, drawn over the whole cohort from the stream
        ``fed_avg.STRAGGLER_STREAM``); 0 = none.
      drop_stragglers: drop stragglers (no training, no uplink, not in the
        ensemble) instead of keeping their ``U{1..E-1}`` epochs of work.
      dp: optional :class:`fedjax_kd.privacy.DP`: DP-FedAvg on the deltas
        (module docstring); one group only. None = none.
      output_dp: optional :class:`fedjax_kd.privacy.DP` on the ensemble
        logits (module docstring); one group only. None = none.

    Returns:
      A :class:`~fedjax_kd.types.FederatedAlgorithm`; ``round`` needs
      ``server_data["proxy_x"]`` when ``distill_steps > 0``. With several
      groups, ``eval_models`` reports the mean accuracy over the groups' models
      (headline) and each group's model.
    """
    models = tuple(models)
    num_groups = len(models)
    if num_groups < 1 or distill_steps < 0 or distill_batch_size < 1 or temperature <= 0:
        raise ValueError("fed_df needs >= 1 model, distill_steps >= 0, temperature > 0")
    check_stragglers(straggler_fraction, epochs)
    aggregate.check_private_outputs("fed_df", output_dp, dp, num_groups)
    output_clip = None if output_dp is None else output_dp.clip_norm
    if distill_optimizer is None:
        distill_optimizer = optax.chain(optax.clip_by_global_norm(5.0), optax.adam(1e-3))
    updates = [
        make_client_update(m.apply, client_optimizer, epochs=epochs, batch_size=batch_size)
        for m in models
    ]
    distillers = [
        distill.make_server_distill(
            m.apply,
            distill_optimizer,
            steps=distill_steps,
            batch_size=distill_batch_size,
            temperature=temperature,
        )
        for m in models
    ]

    def init(key: jax.Array) -> FedDFState:
        # Group 0 uses the key itself so that one-group FedDF starts as FedAvg.
        params = tuple(
            m.init(key if g == 0 else jax.random.fold_in(key, g)) for g, m in enumerate(models)
        )
        return FedDFState(params=params, opt_state=tuple(server_optimizer.init(p) for p in params))

    def round_fn(state: FedDFState, cohort_data, key: jax.Array, server_data=None):
        check_cohort(cohort_data)
        num_clients = cohort_data.size
        per_group = num_clients // num_groups
        inputs = client_inputs(
            key,
            num_clients,
            epochs=epochs,
            straggler_fraction=straggler_fraction,
            drop_stragglers=drop_stragglers,
            straggler_key=jax.random.fold_in(key, STRAGGLER_STREAM),
        )
        proxy_x = None
        if distill_steps > 0:
            if not server_data or "proxy_x" not in server_data:
                raise ValueError("fed_df with distill_steps > 0 needs a proxy set")
            proxy_x = server_data["proxy_x"]
        new_params, new_opt, finite, up, down = [], [], [], [], []
        loss_sum = examples = members = 0.0
        proxy_logits = 0.0
        private_metrics = {}
        for g in range(num_groups):
            rows = slice(g * per_group, (g + 1) * per_group)
            params_g = state.params[g]

            def ensemble_terms(out, g=g, params_g=params_g):
                return aggregate.ensemble_contribution(
                    models[g].apply, params_g, out, proxy_x, clip_norm=output_clip
                )

            dp_args = {}
            if dp is not None:  # one group only (check_private_outputs)
                dp_args = {"dp": dp, "dp_key": jax.random.fold_in(key, DP_STREAM)}

            step = fedavg_step(
                params_g,
                state.opt_state[g],
                cohort_data.slice(rows.start, rows.stop),
                jax.tree.map(lambda a, rows=rows: a[rows], inputs),
                client_update=updates[g],
                server_optimizer=server_optimizer,
                uniform_weighting=uniform_weighting,
                extra_terms=None if proxy_x is None else ensemble_terms,
                **dp_args,
            )
            sums = step.sums
            new_params.append(step.params)
            new_opt.append(step.opt_state)
            finite.append(step.finite)
            loss_sum = loss_sum + sums["loss_sum"]
            examples = examples + sums["examples"]
            if proxy_x is not None:
                proxy_logits = proxy_logits + sums["proxy_logits"]
                members = members + sums["members"]
            if dp is not None:
                private_metrics["dp_clipped_fraction"] = sums["dp_clipped"] / num_clients
            if output_dp is not None and proxy_x is not None:
                clipped = sums["output_clipped"] / num_clients
                private_metrics["dp_output_clipped_fraction"] = clipped
            up.append(step.uplink)
            down.append(step.downlink)
        distill_loss = jnp.zeros((), jnp.float32)
        server_forward = 0
        if proxy_x is not None:
            # Ensemble of ALL cohort clients (every group's local models): mean logits.
            if output_dp is None:
                target = proxy_logits / jnp.maximum(members, 1.0)
            else:  # clipped blocks: noise once on the sum, divided by K
                output_key = jax.random.fold_in(key, aggregate.OUTPUT_DP_STREAM)
                target = privacy.noised_mean(proxy_logits, output_key, output_dp, num_clients)
            dl = []
            for g in range(num_groups):
                p, m = distillers[g](new_params[g], proxy_x, target, jax.random.fold_in(key, g + 1))
                new_params[g] = p
                finite.append(aggregate.tree_all_finite(p))
                dl.append(m["distill_loss"])
            distill_loss = jnp.mean(jnp.stack(dl))
            server_forward = num_clients * proxy_x.shape[0]
        metrics = {
            "train_loss": loss_sum / jnp.maximum(examples, 1.0),
            "uplink_bytes": jnp.concatenate(up),
            "downlink_bytes": jnp.concatenate(down),
            "finite": jnp.all(jnp.stack(finite)),
            "distill_loss": distill_loss,
            "server_forward_examples": jnp.asarray(server_forward, jnp.int32),
            **private_metrics,
        }
        return FedDFState(params=tuple(new_params), opt_state=tuple(new_opt)), metrics

    def eval_models(state: FedDFState) -> dict[str, tuple]:
        if num_groups == 1:
            return {"global": (models[0].apply, state.params[0])}

        def apply_all(params: PyTree, x: jax.Array) -> jax.Array:
            return jnp.stack([m.apply(p, x) for m, p in zip(models, params, strict=True)])

        entries = {"groups_mean": (apply_all, state.params)}
        for g, m in enumerate(models):
            entries[f"group{g}_{m.name}"] = (m.apply, state.params[g])
        return entries

    return FederatedAlgorithm(
        init=init,
        round=round_fn,
        eval_models=eval_models,
        sample_cohort=cohort.group_sampler(num_groups),
    )


def _build(ctx: BuildContext) -> FederatedAlgorithm:
    return fed_df(
        ctx.group_models,
        temperature=ctx.config.server.distill_temperature,
        dp=ctx.robust.get("dp"),
        output_dp=ctx.robust.get("output_dp"),
        **ctx.distill,
        **ctx.stragglers,
        **ctx.common,
    )


#: How the experiment layer builds FedDF (its settings are ``server.distill_*``).
SPEC = AlgorithmSpec(
    name="feddf",
    help="FedDF (Lin et al. 2020): FedAvg then ensemble distillation on the proxy set; "
    "architecture groups",
    build=_build,
    needs_proxy=with_server_distillation,
    groups=True,
    stragglers=True,
    private_outputs=True,
    private_updates=True,
)
