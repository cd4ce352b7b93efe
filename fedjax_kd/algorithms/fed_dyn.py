"""FedDyn: federated learning with dynamic regularization.

Acar, Zhao, Navarro, Mattina, Whatmough & Saligrama, "Federated Learning
Based on Dynamic Regularization", ICLR 2021, arXiv 2111.04263. Official code:
``alpemreacar/FedDyn@48a19fa`` (``utils_methods.py:train_FedDyn``,
``utils_general.py:train_feddyn_mdl``), see ``shared/REFERENCES_NEXT.md``.

Server state: the server model ``theta``, the server's ``h`` and every
client's ``grad_i`` (its estimate of ``grad L_i(theta_i)``), all zeros at the
start but ``theta``. One round ``t`` over a sampled cohort ``P_t`` of the
``m`` clients, as the paper's Algorithm 1:

    client i in P_t, from theta^{t-1}:
      theta_i^t = argmin_theta  L_i(theta) - <grad_i, theta>
                                + (alpha / 2) ||theta - theta^{t-1}||^2
      grad_i   <- grad_i - alpha (theta_i^t - theta^{t-1})
    server:
      h        <- h - alpha (1/m) sum_{i in P_t} (theta_i^t - theta^{t-1})
      theta^t   = (1/|P_t|) sum_{i in P_t} theta_i^t - h / alpha

How each line is computed here:

* The argmin is the library's local training (:func:`fedjax_kd.client.
  local_train`: ``epochs`` of shuffled minibatches of ``batch_size`` with
  ``client_optimizer``, exact padding), as the authors' code does (E epochs
  of SGD), not an exact minimisation. The quadratic ``(alpha/2) ||theta -
  theta^{t-1}||^2`` is a *loss term*: FedProx's proximal term of
  :func:`fedjax_kd.client.make_client_update` with ``prox_mu = alpha``. The
  linear ``-<grad_i, theta>`` is a *gradient transform* ahead of
  ``client_optimizer`` (:func:`linear_term`) adding ``-grad_i`` to every
  minibatch gradient (its gradient is constant). So with ``grad_i = 0`` (the
  first round of every client) the client is FedProx's with ``mu = alpha``,
  bit for bit.
* ``grad_i``'s update is computed from the client's ``delta_i = theta^{t-1}
  - theta_i^t`` (what FedAvg uploads): ``grad_i <- grad_i + alpha delta_i``.
  A client that takes no step has ``delta_i = 0`` and keeps ``grad_i``.
  Clients outside ``P_t`` keep theirs.
* The server: :func:`fedjax_kd.algorithms.fed_avg.fedavg_step` with uniform
  weighting computes ``Delta = (1/|P_t|) sum delta_i`` and the optimizer's
  step ``theta' = theta^{t-1} + ServerOpt(-Delta)``, which with
  ``server_optimizer = optax.sgd(1.0)`` is ``(1/|P_t|) sum theta_i^t``; the
  uniform sum ``S = sum_{i in P_t} delta_i`` comes from ``fedavg_step``'s
  ``extra_terms``. Then ``h <- h + (alpha/m) S`` and ``theta^t = theta' - h /
  alpha``. ``sgd(1.0)`` is the paper's rule. Any other ``server_optimizer``
  replaces the averaging step only (``theta' = theta^{t-1} +
  ServerOpt(-Delta)``, then the same ``- h/alpha``); that combination is
  not in the paper and not analysed (the builder cannot inspect an optax
  optimizer, so it does not refuse one: use ``sgd(1.0)``).

The authors' code writes the same algorithm in another parametrization: it
stores ``hist_i = sum over i's rounds of (theta_i - theta^{t-1})`` (so
``grad_i = -alpha hist_i``), trains on ``L_i(theta) + alpha <theta, hist_i -
theta^{t-1}> + ((alpha + wd)/2) ||theta||^2`` (the quadratic as SGD weight
decay), which has the gradient of the paper's objective (plus ``wd theta``),
and sets ``theta^t = mean_{P_t} theta_i + mean_{all m} hist_i`` (``=
mean_{P_t} theta_i - h/alpha``). Deviations from it, each an argument:

* ``clip_norm=None``: no gradient clipping (the paper's Algorithm 1). The
  code clips to ``max_norm = 10`` the gradient of its loss before SGD's
  weight decay adds ``(alpha + wd) theta``, that is ``g_L - grad_i - alpha
  theta^{t-1}`` (:func:`linear_term` with ``clip_norm`` reproduces exactly
  this split: it clips ``g - grad_i - alpha theta`` where ``g`` already holds
  the proximal gradient ``alpha (theta - theta^{t-1})``, then adds ``alpha
  theta``). ``clip_norm=10.0`` is the code's.
* Weight decay ``wd`` (the code's ``weight_decay``, ``1e-3`` in its CIFAR-10
  example) belongs to ``client_optimizer`` here (e.g. ``optax.chain(
  optax.add_decayed_weights(wd), optax.sgd(lr))``); none by default.
* The code scales alpha per client, ``alpha_i = alpha / (n_i / mean_j
  n_j)``; here every client uses ``alpha`` (the paper's Algorithm 1). Not
  implemented.
* ``uniform_weighting=True``: the average over ``P_t`` is uniform, as the
  paper and the code (``np.mean``). ``False`` weights ``theta_i`` by its
  examples, the library's FedAvg (not the paper's); ``h`` always uses the
  uniform sum. A cohort client with no examples has uniform weight 0 in the
  average (``fedavg_step``'s rule) where the paper would count its unchanged
  ``theta^{t-1}``.
* Evaluation: :attr:`~fedjax_kd.types.FederatedAlgorithm.eval_models` has
  ``global`` (the server model ``theta^t``, the headline, sent to the next
  cohort) and ``average`` (``theta^t + h/alpha = mean_{P_t} theta_i^t``, the
  model the code's "sel" accuracy evaluates: ``avg_model``).
* The code's per-round learning-rate decay (``lr_decay_per_round``) is the
  client optimizer's schedule, outside this algorithm.

Communication per cohort client and round: as FedAvg (params down, the delta
and the float32 aggregation weight up); ``grad_i`` stays on the client and
``h`` on the server.

Per-client state: the ``grad_i`` are a :class:`~fedjax_kd.cohort.ClientStore`
of ``num_clients`` rows (row = client id) in :class:`FedDynState`,
checkpointed with the run; the round trains its clients chunk by chunk
(``client_chunk_size``) through ``fedavg_step``'s store.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_kd import aggregate
from fedjax_kd.algorithms.fed_avg import (
    check_client_state_builder,
    check_fixed_cohort,
    client_inputs,
    fedavg_step,
    train_loss,
)
from fedjax_kd.client import make_client_update
from fedjax_kd.cohort import ClientStore
from fedjax_kd.data.federated import check_cohort
from fedjax_kd.spec import AlgorithmSpec, BuildContext, Hyper, positive
from fedjax_kd.types import ClientOutput, FederatedAlgorithm, Params, PyTree


class FedDynState(NamedTuple):
    """Server state of :func:`fed_dyn`.

    Attributes:
      params: the server model ``theta^t`` (after the ``- h/alpha`` correction).
      opt_state: the server optimizer's state.
      h: the server's ``h`` (the params' shapes; zeros at init).
      client_grads: every client's ``grad_i``, a
        :class:`~fedjax_kd.cohort.ClientStore` of ``num_clients`` rows (row =
        client id; on a real deployment row ``i`` lives on client ``i``).
    """

    params: Params
    opt_state: PyTree
    h: Params
    client_grads: ClientStore


def linear_term(
    grad_i: Params, *, alpha=0.0, clip_norm: float | None = None
) -> optax.GradientTransformation:
    """The gradient transform of FedDyn's linear term ``-<grad_i, theta>``: ``g -> g - grad_i``.

    Chained ahead of the client optimizer; ``g`` is the gradient of the
    client's loss with the proximal term, ``grad L_i + alpha (theta -
    theta^{t-1})``. With ``clip_norm``, the authors' clipping: ``u = g -
    grad_i - alpha theta`` (their loss's gradient before weight decay) is
    clipped to global norm ``clip_norm`` and ``alpha theta`` added back
    (needs ``params``). Stateless.

    Args:
      grad_i: the client's state ``grad_i`` (the params' shapes).
      alpha: FedDyn's ``alpha`` (used with ``clip_norm`` only).
      clip_norm: None = no clipping (the paper).
    """

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        if clip_norm is None:
            return jax.tree.map(jnp.subtract, updates, grad_i), state
        if params is None:
            raise ValueError("linear_term with clip_norm needs the params")
        u = jax.tree.map(lambda g, s, p: g - s - alpha * p, updates, grad_i, params)
        norm = optax.tree.norm(u)
        scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))
        return jax.tree.map(lambda a, p: a * scale + alpha * p, u, params), state

    return optax.GradientTransformation(init, update)


def _norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(tree)))


def fed_dyn(
    model,
    *,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    num_clients: int,
    alpha: float = 0.01,
    uniform_weighting: bool = True,
    clip_norm: float | None = None,
) -> FederatedAlgorithm:
    """Builds FedDyn (Algorithm 1 of Acar et al. 2021; see the module docstring).

    Args:
      model: the global model (pure ``init``/``apply``).
      client_optimizer: optax optimizer of the local steps (``optax.sgd(lr)``
        as the paper's code); it steps on the gradient of ``L_i - <grad_i,
        theta> + (alpha/2) ||theta - theta^{t-1}||^2``.
      server_optimizer: optax optimizer of the averaging step on the
        pseudo-gradient ``Delta`` (``sgd(1.0)``: the paper's rule; others
        are outside the paper), before the ``- h/alpha`` correction.
      epochs: local epochs ``E`` per round.
      batch_size: local minibatch size ``B``.
      num_clients: the population ``m`` (rows of the ``grad_i`` store, and
        the denominator of ``h``'s update).
      alpha: the dynamic regularizer's weight ``alpha > 0`` (the code's
        default ``1e-2``).
      uniform_weighting: the uniform mean of the cohort's models (the
        paper's); False: weighted by examples.
      clip_norm: clip the local gradient as the authors' code (``10.0``
        there); None = no clipping (the paper).

    Returns:
      A :class:`~fedjax_kd.types.FederatedAlgorithm` over a
      :class:`FedDynState`; its metrics add ``h_norm`` (``||h||`` after the
      round) to FedAvg's.

    Example::

      algo = fed_dyn(model, client_optimizer=optax.sgd(0.1),
                     server_optimizer=optax.sgd(1.0), epochs=5, batch_size=50,
                     num_clients=100, alpha=0.01)
    """
    check_client_state_builder("fed_dyn", num_clients, epochs, batch_size)
    if not alpha > 0:
        raise ValueError(f"fed_dyn needs alpha > 0 (theta^t divides h by alpha), got {alpha}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")

    def client_update(params, x, y, count, key, targets=None, num_epochs=None, *, state):
        local = make_client_update(
            model.apply,
            optax.chain(linear_term(state, alpha=alpha, clip_norm=clip_norm), client_optimizer),
            epochs=epochs,
            batch_size=batch_size,
            prox_mu=alpha,  # the quadratic (alpha/2)||theta - theta^{t-1}||^2, in the loss
        )
        out: ClientOutput = local(params, x, y, count, key, targets, num_epochs=num_epochs)
        # grad_i <- grad_i - alpha (theta_i - theta^{t-1}) = grad_i + alpha delta_i
        new = jax.tree.map(lambda g, d: g + alpha * d, state, out.delta)
        return out._replace(state=new)

    def init(key: jax.Array) -> FedDynState:
        params = model.init(key)  # the same init key as FedAvg: the same initial model
        return FedDynState(
            params=params,
            opt_state=server_optimizer.init(params),
            h=jax.tree.map(jnp.zeros_like, params),
            client_grads=ClientStore.zeros(params, num_clients),
        )

    def round_fn(state: FedDynState, cohort, key: jax.Array, server_data=None):
        check_cohort(cohort)
        del server_data  # FedDyn uses no server-side data
        check_fixed_cohort(cohort, "fed_dyn")
        inputs = client_inputs(key, cohort.size)
        inputs["id"] = cohort.ids  # the rows of the clients' grad_i

        step = fedavg_step(
            state.params,
            state.opt_state,
            cohort,
            inputs,
            client_update=client_update,
            server_optimizer=server_optimizer,
            uniform_weighting=uniform_weighting,
            extra_terms=lambda out: {"delta_sum": out.delta},  # S = sum_{P_t} delta_i
            store=state.client_grads,
        )
        # h <- h - alpha (1/m) sum (theta_i - theta^{t-1}) = h + (alpha/m) S
        new_h = jax.tree.map(
            lambda h, s: h + (alpha / num_clients) * s, state.h, step.sums["delta_sum"]
        )
        new_params = jax.tree.map(lambda p, h: p - h / alpha, step.params, new_h)
        metrics = {
            "train_loss": train_loss(step.sums),
            "uplink_bytes": step.uplink,
            "downlink_bytes": step.downlink,
            "finite": step.finite
            & aggregate.tree_all_finite(new_h)
            & aggregate.tree_all_finite(new_params),
            "h_norm": _norm(new_h),
        }
        new_state = FedDynState(
            params=new_params, opt_state=step.opt_state, h=new_h, client_grads=step.store
        )
        return new_state, metrics

    def eval_models(state: FedDynState):
        average = jax.tree.map(lambda p, h: p + h / alpha, state.params, state.h)
        return {"global": (model.apply, state.params), "average": (model.apply, average)}

    return FederatedAlgorithm(init=init, round=round_fn, eval_models=eval_models)


def _build(ctx: BuildContext) -> FederatedAlgorithm:
    common = dict(ctx.common)
    # Uniform unless both algorithm.uniform_weighting and feddyn.uniform are off.
    common["uniform_weighting"] = ctx.hp["uniform"] or common.get("uniform_weighting", False)
    clip = ctx.hp["clip_norm"]
    return fed_dyn(
        ctx.student,
        num_clients=ctx.personal["num_clients"],
        alpha=ctx.hp["alpha"],
        clip_norm=clip if clip > 0 else None,
        **common,
    )


#: How the experiment layer builds FedDyn (``fedjax_kd.algorithms.fed_dyn:SPEC``
#: until registered as ``feddyn``; keys ``feddyn.*``).
SPEC = AlgorithmSpec(
    name="feddyn",
    help="FedDyn (Acar et al. 2021): dynamic regularizer -<grad_i, w> + "
    "(alpha/2)||w - w_global||^2 per client, "
    "server model mean(w_i) - h/alpha (server.optimizer=sgd, server.lr=1)",
    build=_build,
    hypers={
        "alpha": Hyper(0.01, "FedDyn's alpha of the dynamic regularizer", **positive()),
        "uniform": Hyper(
            True,
            "average the cohort's models uniformly (the paper); false and "
            "algorithm.uniform_weighting=false: by examples",
        ),
        "clip_norm": Hyper(
            0.0,
            "clip local gradients as the authors' code (10.0 there); 0 = off",
            check=lambda v: v >= 0,
            allowed=">= 0",
        ),
    },
    per_client_state=True,
)
