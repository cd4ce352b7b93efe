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

    Returns:
      A :class:`~fedjax_kd.types.FederatedAlgorithm`.
    """
    client_update = make_client_update(
        model.apply, client_optimizer, epochs=epochs, batch_size=batch_size
    )
    return from_client_update(
        model, client_update, server_optimizer, uniform_weighting=uniform_weighting
    )


def from_client_update(
    model,
    client_update: ClientUpdateFn,
    server_optimizer: optax.GradientTransformation,
    *,
    uniform_weighting: bool = False,
    targets_fn=None,
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
    """

    def init(key: jax.Array) -> ServerState:
        params = model.init(key)
        return ServerState(params=params, opt_state=server_optimizer.init(params))

    def round_fn(state: ServerState, cohort, key: jax.Array, server_data=None):
        del server_data  # FedAvg uses no server-side data.
        num_clients = as_cohort(cohort).size
        keys = jax.random.split(key, num_clients)

        def contribution(client, client_key):
            targets = None if targets_fn is None else targets_fn(state.params, client.x)
            out = client_update(state.params, client.x, client.y, client.count, client_key, targets)
            return aggregate.fedavg_contribution(out, uniform=uniform_weighting)

        sums = aggregate.sum_over_clients(contribution, cohort, keys)
        delta = aggregate.divide(sums["weighted_delta"], sums["weight"])
        params, opt_state = aggregate.server_update(
            state.params, state.opt_state, delta, server_optimizer
        )
        # Arrays actually exchanged: params down; delta (params-shaped) and weight up.
        per_client_down = tree_bytes(state.params)
        per_client_up = tree_bytes(state.params) + tree_bytes(sums["weight"])
        metrics = {
            "train_loss": sums["loss_sum"] / jnp.maximum(sums["examples"], 1.0),
            "uplink_bytes": jnp.full((num_clients,), per_client_up, jnp.int32),
            "downlink_bytes": jnp.full((num_clients,), per_client_down, jnp.int32),
            "finite": aggregate.tree_all_finite(delta) & aggregate.tree_all_finite(params),
        }
        return ServerState(params=params, opt_state=opt_state), metrics

    def eval_models(state: ServerState):
        return {"global": (model.apply, state.params)}

    return FederatedAlgorithm(init=init, round=round_fn, eval_models=eval_models)
