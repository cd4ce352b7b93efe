"""FedNova: federated normalized averaging.

Wang, Liu, Liang, Joshi & Poor, "Tackling the Objective Inconsistency Problem
in Heterogeneous Federated Optimization", NeurIPS 2020, arXiv 2007.07481;
the authors' code is ``JYWa/FedNova@47b4e09`` (``distoptim/FedNova.py``,
``train_LocalSGD.py``). The equations are named by their role below, not by
the paper's numbers (which were not checked against the paper's text here).

Client ``i`` of the round's cohort starts from the global ``x`` and takes
``tau_i`` local optimizer steps, ending at ``y_i``; ``tau_i`` differs between
clients through their data sizes and their epoch budgets (stragglers). With
``Delta_i = x - y_i`` (the FedAvg family's delta, ``eta * sum_k G_i a_i`` in
the paper's notation):

    tau_i      = e_i * ceil(n_i / B)                  (real steps; :func:`local_steps`)
    ||a_i||_1  = tau_i                                (vanilla SGD: a_i = [1, ..., 1])
               = sum_{k=1..tau_i} (1 - rho^k)/(1 - rho)   (heavy-ball momentum rho)
    d_i        = Delta_i / ||a_i||_1                  (normalized update)
    p_i        = n_i / sum_{j in S} n_j               (``uniform_weighting``: 1/|S|)
    tau_eff    = sum_i p_i ||a_i||_1                  (effective local steps)
    x         <- x + ServerOpt(-tau_eff * sum_i p_i d_i)

With ``server_optimizer = sgd(1.0)`` the last line is the paper's FedNova
update ``x <- x - tau_eff * sum_i p_i d_i`` (the paper writes ``eta d_i`` with
``d_i`` normalized gradients; here ``d_i`` holds ``eta`` already). With equal
``tau_i`` across the cohort it is exactly FedAvg (``tau_eff / tau = 1``); with
unequal ones FedAvg's aggregate weighs a client by ``p_i tau_i``, the
surrogate objective FedNova removes.

How the steps are counted. ``tau_i`` is the number of optimizer steps
:func:`fedjax_kd.client.local_train` really takes: each of the client's
``e_i`` epochs (``E``, or a straggler's budget) runs ``ceil(n_i / b)`` steps
with a real example, ``b = min(B, N)`` for a client padded to ``N`` rows, and
``ceil(n_i / b) = ceil(n_i / B)`` since ``n_i <= N``; padded steps and the
steps of epochs past the budget leave the params (and momentum) untouched and
are not counted. The round takes ``tau_i`` from the scan itself (its
``local_steps`` metric), so it is the count of steps taken, not a formula;
:func:`local_steps` is the same number in closed form (tested equal). The
authors' loader keeps the last partial batch (``drop_last=False``), so their
``tau_i = local_epochs * len(train_loader)`` is this ceil too; the paper's
introduction writes ``floor(E n_i / B)``.

The momentum normalizer is the authors': per step ``c <- rho c + 1`` and
``||a||_1 += c`` (``c_k = (1 - rho^k)/(1 - rho)``), the momentum buffer
fresh every round (PyTorch's ``buf <- rho buf + g``, which is optax's
``sgd(lr, momentum=rho)`` trace). It is right for a client optimizer that is
SGD (``momentum=0``) or heavy-ball SGD with that ``momentum``; the builder
cannot see inside an optax optimizer, so the caller says which. Not offered:
the authors' proximal normalizer (``a <- a (1 - eta mu) + 1``, FedProx's local
solver, with ``tau_eff = sum p_i tau_i``), Nesterov momentum and adaptive
client optimizers (no ``a_i`` for them in the paper or the code); nor the
FedAvg family's robust aggregators, attacks, DP, uplink codecs and Poisson
cohorts (``SPEC.robust`` is False). The experiment layer passes
``client.momentum`` with ``client.optimizer=momentum`` (the authors' script,
``launch_exp.sh``, uses momentum 0.9) and refuses ``adam``.

Differences from the authors' code, and why:

* Every client takes part in every round there (``p_i = n_i / n`` over all
  clients); here a round samples a cohort ``S``, and ``p_i`` and ``tau_eff``
  are over ``S`` with the weights renormalized, as FedAvg's mean is in this
  library. With ``clients_per_round = num_clients`` it is the code's rule.
* Their heterogeneous ``tau`` comes from each client drawing its epochs from
  ``randint(2, localE)`` every round (``--pattern uniform_random``); here it
  comes from the data sizes and from FedProx's stragglers
  (``straggler_fraction``: ``round(s K)`` clients run ``U{1..E-1}`` epochs,
  :func:`fedjax_kd.algorithms.fed_avg.straggler_epochs`), a run's setting
  rather than part of the algorithm. Their script's weight decay (1e-4, added
  to the gradient) and learning-rate decay are run settings too: they do not
  change ``a_i``.
* Their server momentum ``gmf`` (``buf <- gmf buf + Delta / lr``,
  ``x <- x - lr buf``) is ``server_optimizer = sgd(1.0, momentum=gmf)`` (the
  same iterates for a constant ``lr``); any optax server optimizer is taken.
* Not in their code: dropped stragglers (``drop_stragglers``) train nothing
  and have weight 0, so they are in neither ``p`` nor ``tau_eff``.

The chunk loop is FedAvg's (:func:`fedjax_kd.algorithms.fed_avg.fedavg_step`):
each client's upload is ``d_i`` (a wrapper around the client update), and
``w_i ||a_i||_1`` travels as an extra summed term (``w_i`` the FedAvg weight),
so ``tau_eff`` is known only once every chunk has been summed. The server step
therefore runs after ``fedavg_step``, which is handed a server optimizer that
moves nothing. Communication is FedAvg's (params down; ``d_i`` and its weight
up) plus one float32 up per client, ``||a_i||_1``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_kd import aggregate
from fedjax_kd.algorithms.fed_avg import (
    check_stragglers,
    client_inputs,
    fedavg_step,
    train_loss,
)
from fedjax_kd.client import ClientUpdateFn, make_client_update
from fedjax_kd.data.federated import check_cohort
from fedjax_kd.spec import AlgorithmSpec, BuildContext
from fedjax_kd.types import ClientOutput, FederatedAlgorithm, ServerState

#: ``fedavg_step``'s server step is a no-op here: FedNova's own step needs
#: ``tau_eff``, a sum over every chunk (see the module docstring).
_NO_SERVER_STEP = optax.set_to_zero()


def local_steps(count, num_epochs, batch_size: int):
    """``tau_i``: the optimizer steps :func:`fedjax_kd.client.local_train` takes.

    ``num_epochs * ceil(count / batch_size)`` (0 for a client without data):
    every epoch runs the steps whose minibatch holds a real example, however
    far the client is padded (see the module docstring).

    Args:
      count: the client's real examples ``n_i`` (int, or an int array).
      num_epochs: its epoch budget ``e_i`` (``E``, or a straggler's fewer).
      batch_size: the local minibatch size ``B``.

    Returns:
      int32 ``tau_i`` (the shape of ``count``).
    """
    count = jnp.asarray(count, jnp.int32)
    return (jnp.asarray(num_epochs, jnp.int32) * (-(-count // batch_size))).astype(jnp.int32)


def normalizer(tau, momentum: float = 0.0):
    """``||a_i||_1`` of ``tau`` local steps: ``tau`` for SGD, the authors' sum with momentum.

    With heavy-ball momentum ``rho`` the local update is ``eta G a`` with
    ``a_k = (1 - rho^(tau-k+1)) / (1 - rho)``, so
    ``||a||_1 = sum_{k=1..tau} (1 - rho^k) / (1 - rho)
    = (tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho)``
    (``FedNova.step``'s ``local_counter``/``local_normalizing_vec`` recurrence).

    Args:
      tau: the number of local steps (int array, may be traced).
      momentum: the client optimizer's momentum ``rho`` in ``[0, 1)``.

    Returns:
      float32 ``||a_i||_1`` (0 for ``tau = 0``).
    """
    tau = jnp.asarray(tau, jnp.float32)
    if momentum == 0.0:
        return tau
    rho = jnp.float32(momentum)
    return (tau - rho * (1.0 - rho**tau) / (1.0 - rho)) / (1.0 - rho)


def normalized_client_update(client_update: ClientUpdateFn, *, momentum: float = 0.0):
    """FedNova's client: ``client_update`` with its delta divided by ``||a_i||_1``.

    ``tau_i`` is the ``local_steps`` metric of ``client_update`` (the steps its
    scan took with a real example: :func:`fedjax_kd.client.make_client_update`
    reports it).

    Args:
      client_update: a :func:`fedjax_kd.client.make_client_update` function.
      momentum: the client optimizer's heavy-ball momentum (0 = plain SGD).

    Returns:
      A function of ``client_update``'s signature whose
      :class:`~fedjax_kd.types.ClientOutput` has ``delta = d_i`` (0 for a
      client that took no step) and the extra metric ``nova_norm``
      (``||a_i||_1``).
    """

    def update(params, x, y, count, key, targets=None, num_epochs=None, **kwargs) -> ClientOutput:
        out = client_update(params, x, y, count, key, targets, num_epochs=num_epochs, **kwargs)
        norm = normalizer(out.metrics["local_steps"], momentum)
        # tau_i = 0 only without data, when the delta is exactly 0 already.
        scale = 1.0 / jnp.maximum(norm, 1.0)
        delta = jax.tree.map(lambda d: d * scale.astype(d.dtype), out.delta)
        return out._replace(delta=delta, metrics={**out.metrics, "nova_norm": norm})

    return update


def fed_nova(
    model,
    *,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    uniform_weighting: bool = False,
    straggler_fraction: float = 0.0,
    drop_stragglers: bool = False,
    momentum: float = 0.0,
) -> FederatedAlgorithm:
    """Builds FedNova (see the module docstring for the equations).

    Args:
      model: a :class:`fedjax_kd.models.Model` (pure ``init`` and ``apply``).
      client_optimizer: optax optimizer for local training: ``optax.sgd(lr)``,
        or ``optax.sgd(lr, momentum=momentum)`` with ``momentum`` below.
      server_optimizer: optax optimizer on the pseudo-gradient
        ``tau_eff * sum_i p_i d_i``; ``sgd(1.0)`` is the paper's update.
      epochs: local epochs ``E`` per round.
      batch_size: local minibatch size ``B``.
      uniform_weighting: ``p_i = 1/|S|`` over the clients with data instead
        of ``n_i / n``.
      straggler_fraction: fraction of each cohort that are stragglers and
        run ``U{1..E-1}`` epochs (:func:`fedjax_kd.algorithms.fed_avg.straggler_epochs`).
      drop_stragglers: drop stragglers (no training, weight 0) instead of
        normalizing their partial work.
      momentum: the client optimizer's heavy-ball momentum ``rho`` in
        ``[0, 1)``, for the normalizer ``||a_i||_1`` (:func:`normalizer`);
        0 = vanilla SGD.

    Returns:
      A :class:`~fedjax_kd.types.FederatedAlgorithm` whose round metrics are
      FedAvg's (``train_loss``, ``uplink_bytes``, ``downlink_bytes``,
      ``finite``) plus ``tau_eff``.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"FedNova momentum must be in [0, 1), got {momentum}")
    check_stragglers(straggler_fraction, epochs)
    client_update = normalized_client_update(
        make_client_update(model.apply, client_optimizer, epochs=epochs, batch_size=batch_size),
        momentum=momentum,
    )

    def extra_terms(out: ClientOutput) -> dict:
        # w_i ||a_i||_1 with FedAvg's weight w_i, so tau_eff = sum / sum_i w_i.
        w = aggregate.client_weights(out.weight, uniform=uniform_weighting)
        return {"nova_tau": w * out.metrics["nova_norm"]}

    def init(key: jax.Array) -> ServerState:
        params = model.init(key)
        return ServerState(params=params, opt_state=server_optimizer.init(params))

    def round_fn(state: ServerState, cohort, key: jax.Array, server_data=None):
        check_cohort(cohort)
        del server_data  # FedNova uses no server-side data.
        inputs = client_inputs(
            key,
            cohort.size,
            epochs=epochs,
            straggler_fraction=straggler_fraction,
            drop_stragglers=drop_stragglers,
        )
        step = fedavg_step(
            state.params,
            _NO_SERVER_STEP.init(state.params),
            cohort,
            inputs,
            client_update=client_update,
            server_optimizer=_NO_SERVER_STEP,
            uniform_weighting=uniform_weighting,
            extra_terms=extra_terms,
        )
        # step.delta = sum_i w_i d_i / sum_i w_i = sum_i p_i d_i.
        tau_eff = aggregate.divide(step.sums["nova_tau"], step.sums["weight"])
        pseudo_grad = jax.tree.map(lambda d: tau_eff.astype(d.dtype) * d, step.delta)
        updates, opt_state = server_optimizer.update(pseudo_grad, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "train_loss": train_loss(step.sums),
            # ||a_i||_1 travels up beside the weight: one more float32.
            "uplink_bytes": jnp.where(step.uplink > 0, step.uplink + 4, 0).astype(jnp.int32),
            "downlink_bytes": step.downlink,
            "finite": step.finite & aggregate.tree_all_finite(params),
            "tau_eff": tau_eff,
        }
        return ServerState(params=params, opt_state=opt_state), metrics

    def eval_models(state: ServerState):
        return {"global": (model.apply, state.params)}

    # client_update stays None: a baseline averaging the clients' outputs the
    # FedAvg way would not be FedNova's round.
    return FederatedAlgorithm(init=init, round=round_fn, eval_models=eval_models)


def _client_momentum(config) -> float:
    """The normalizer's ``rho`` for the run's client optimizer (ValueError for Adam)."""
    name = config.client.optimizer
    if name == "sgd":
        return 0.0
    if name == "momentum":
        return float(config.client.momentum)
    raise ValueError(
        f"FedNova normalizes SGD or heavy-ball momentum local steps; client.optimizer={name!r} "
        "has no normalizer (use sgd or momentum)"
    )


def _build(ctx: BuildContext) -> FederatedAlgorithm:
    return fed_nova(
        ctx.student, momentum=_client_momentum(ctx.config), **ctx.stragglers, **ctx.common
    )


#: How the experiment layer builds FedNova (``algorithm.name=fednova``, or by
#: import path ``fedjax_kd.algorithms.fed_nova:SPEC``).
SPEC = AlgorithmSpec(
    name="fednova",
    help="FedNova (Wang et al. 2020): updates normalized by local steps, scaled by tau_eff",
    build=_build,
    stragglers=True,
)
