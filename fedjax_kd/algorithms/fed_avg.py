"""FedAvg with a server optimizer (FedAvg / FedAvgM / FedAdam / FedYogi / FedAdagrad).

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017, arXiv 1602.05629; server optimizers from
Reddi et al., "Adaptive Federated Optimization", ICLR 2021, arXiv 2003.00295.

One round, for a sampled cohort of K clients:

    delta_k = w - ClientUpdate_k(w)                 (E local epochs, fresh client optimizer)
    delta   = sum_k (n_k / n) delta_k               (``uniform_weighting``: 1/K)
    w       = w + ServerOpt(-delta)                 (sgd(1.0): w = sum_k (n_k/n) w_k)

Communication per client and round: downlink the global params, uplink the
delta and its weight (one float32).

Systems heterogeneity (Li et al., FedProx, arXiv 1812.06127, Sec. 5.2): with
``straggler_fraction = s``, round(s * K) clients of each round's cohort are
stragglers. With ``drop_stragglers`` they are dropped (FedAvg's rule in that
paper: they train nothing and send nothing up); otherwise they send the
partial work of ``U{1, ..., E-1}`` local epochs (numpy's ``randint(1, E)`` as in
the paper's code; 1 when ``E = 1``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_kd import aggregate
from fedjax_kd.client import ClientUpdateFn, make_client_update
from fedjax_kd.compress import tree_bytes
from fedjax_kd.data.federated import as_cohort
from fedjax_kd.types import FederatedAlgorithm, ServerState


def fed_avg(
    model,
    *,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    uniform_weighting: bool = False,
    straggler_fraction: float = 0.0,
    drop_stragglers: bool = False,
) -> FederatedAlgorithm:
    """Builds FedAvg.

    Args:
      model: a :class:`fedjax_kd.models.Model` (anything with pure ``init`` and
        ``apply``).
      client_optimizer: optax optimizer for local training.
      server_optimizer: optax optimizer applied to the pseudo-gradient.
      epochs: local epochs per round.
      batch_size: local minibatch size.
      uniform_weighting: average client deltas uniformly instead of by
        example count.
      straggler_fraction: fraction of each cohort that are stragglers (see
        the module docstring); 0 = none.
      drop_stragglers: drop stragglers instead of aggregating their partial
        work.

    Returns:
      A :class:`~fedjax_kd.types.FederatedAlgorithm`.
    """
    client_update = make_client_update(
        model.apply, client_optimizer, epochs=epochs, batch_size=batch_size
    )
    return from_client_update(
        model,
        client_update,
        server_optimizer,
        uniform_weighting=uniform_weighting,
        epochs=epochs,
        straggler_fraction=straggler_fraction,
        drop_stragglers=drop_stragglers,
    )


def straggler_epochs(
    key: jax.Array, num_clients: int, *, epochs: int, fraction: float
) -> tuple[jax.Array, jax.Array]:
    """Which of ``num_clients`` cohort members straggle, and their local epochs.

    Exactly ``round(fraction * K)`` uniformly chosen clients are stragglers
    with ``U{1, ..., E-1}`` epochs (1 when ``E = 1``); the others run ``E``.

    Returns:
      ``(epochs [K] int32, is_straggler [K] bool)``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"straggler_fraction must be in [0, 1], got {fraction}")
    num_stragglers = round(fraction * num_clients)
    rank_key, epochs_key = jax.random.split(key)
    rank = jnp.argsort(jax.random.permutation(rank_key, num_clients))
    fewer = jax.random.randint(epochs_key, (num_clients,), 1, max(epochs, 2))
    is_straggler = rank < num_stragglers
    return jnp.where(is_straggler, fewer, epochs).astype(jnp.int32), is_straggler


def from_client_update(
    model,
    client_update: ClientUpdateFn,
    server_optimizer: optax.GradientTransformation,
    *,
    uniform_weighting: bool = False,
    targets_fn=None,
    epochs: int | None = None,
    straggler_fraction: float = 0.0,
    drop_stragglers: bool = False,
) -> FederatedAlgorithm:
    """FedAvg's server side around any ``client_update`` (shared by FedProx, FedNTD).

    Args:
      model: the global model (pure ``init``/``apply``).
      client_update: from :func:`fedjax_kd.client.make_client_update`.
      server_optimizer: optax optimizer on the pseudo-gradient.
      uniform_weighting: average deltas uniformly instead of by example count.
      targets_fn: optional ``targets_fn(global_params, x) -> [N, ...]``
        per-example distillation targets computed once per round on each
        client's data from the downloaded global model (FedNTD).
      epochs: the client update's local epochs (needed with stragglers).
      straggler_fraction: fraction of each cohort that are stragglers
        (:func:`straggler_epochs`); 0 = none, and the round is unchanged.
      drop_stragglers: stragglers are dropped (no training, weight 0, no
        uplink) instead of sending ``U{1..E-1}`` epochs of partial work.
    """
    if straggler_fraction and epochs is None:
        raise ValueError("stragglers need the client update's epochs")
    if not 0.0 <= straggler_fraction <= 1.0:
        raise ValueError(f"straggler_fraction must be in [0, 1], got {straggler_fraction}")

    def init(key: jax.Array) -> ServerState:
        params = model.init(key)
        return ServerState(params=params, opt_state=server_optimizer.init(params))

    def round_fn(state: ServerState, cohort, key: jax.Array, server_data=None):
        del server_data  # FedAvg uses no server-side data.
        num_clients = as_cohort(cohort).size
        keys = jax.random.split(key, num_clients)
        per_client = {"key": keys}
        if straggler_fraction:
            # Its own stream: without stragglers the clients' keys are unchanged.
            budget, is_straggler = straggler_epochs(
                jax.random.fold_in(key, 1), num_clients, epochs=epochs, fraction=straggler_fraction
            )
            per_client["epochs"] = budget
            per_client["active"] = ~is_straggler | (not drop_stragglers)

        def contribution(client, inputs):
            targets = None if targets_fn is None else targets_fn(state.params, client.x)
            count = client.count
            if "active" in inputs:
                count = jnp.where(inputs["active"], count, 0)  # dropped: no data, weight 0
            out = client_update(
                state.params,
                client.x,
                client.y,
                count,
                inputs["key"],
                targets,
                num_epochs=inputs.get("epochs"),
            )
            terms = aggregate.fedavg_contribution(out, uniform=uniform_weighting)
            if "active" in inputs:
                # With count 0 the delta is exactly 0; only a uniform weight (1)
                # would still count a dropped client in the denominator.
                terms["weight"] = jnp.where(inputs["active"], terms["weight"], 0.0)
            return terms

        sums = aggregate.sum_over_clients(contribution, cohort, per_client)
        delta = aggregate.divide(sums["weighted_delta"], sums["weight"])
        params, opt_state = aggregate.server_update(
            state.params, state.opt_state, delta, server_optimizer
        )
        # Arrays actually exchanged: params down; delta (params-shaped) and weight up.
        per_client_down = tree_bytes(state.params)
        per_client_up = tree_bytes(state.params) + tree_bytes(sums["weight"])
        uplink = jnp.full((num_clients,), per_client_up, jnp.int32)
        if "active" in per_client:
            uplink = jnp.where(per_client["active"], uplink, 0)  # dropped stragglers
        metrics = {
            "train_loss": sums["loss_sum"] / jnp.maximum(sums["examples"], 1.0),
            "uplink_bytes": uplink,
            "downlink_bytes": jnp.full((num_clients,), per_client_down, jnp.int32),
            "finite": aggregate.tree_all_finite(delta) & aggregate.tree_all_finite(params),
        }
        return ServerState(params=params, opt_state=opt_state), metrics

    def eval_models(state: ServerState):
        return {"global": (model.apply, state.params)}

    return FederatedAlgorithm(init=init, round=round_fn, eval_models=eval_models)
