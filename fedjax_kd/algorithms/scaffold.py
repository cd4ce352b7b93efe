"""SCAFFOLD: stochastic controlled averaging, option II control variates.

Karimireddy, Kale, Mohri, Reddi, Stich & Suresh, "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning", ICML 2020, arXiv 1910.06378.
The paper publishes no code; the reference implementations read were
``apple/pfl-research`` (``pfl/algorithm/scaffold.py``) and
``alpemreacar/FedDyn`` (``utils_methods.py:train_SCAFFOLD``), see
``shared/REFERENCES_NEXT.md``.

Server state: the global model ``x``, the server control variate ``c`` and
every client's control variate ``c_i`` (all zeros at the start). One round
over a sampled cohort ``S`` of the ``N`` clients, numbered as the lines of
the paper's Algorithm 1:

    (5)  the server sends (x, c) to every i in S
    (7)  y_i <- x
    (10) y_i <- y_i - eta_l (g_i(y_i) - c_i + c)           K_i times (K_i: below)
    (12) c_i+ <- c_i - c + (x - y_i) / (K_i eta_l)         option II
    (13) client i sends (Delta y_i, Delta c_i) = (y_i - x, c_i+ - c_i)
    (14) c_i <- c_i+
    (16) (Delta x, Delta c) = mean_{i in S} (Delta y_i, Delta c_i)
    (17) x <- x + eta_g Delta x,   c <- c + (|S| / N) Delta c

How each line is computed here:

* (10) is the client optimizer fed the *corrected gradient*: a gradient
  transform that adds ``c - c_i`` to the minibatch gradient ahead of
  ``client_optimizer`` (as pfl-research adds it to ``.grad`` before the
  optimizer step), not a linear term in the loss. With ``optax.sgd(eta_l)``
  it is line (10) exactly. The local loop is the library's
  (:func:`fedjax_kd.client.local_train`: shuffled minibatches, exact
  padding), so without the correction the client is FedAvg's.
* ``K_i`` is the number of optimizer steps client ``i`` actually took: the
  ``local_steps`` that ``local_train`` counts (steps whose batch holds a real
  example; padded steps change nothing). That is ``E * ceil(n_i / B)`` for a
  client of ``n_i`` real examples (``n_i`` after the per-round cap
  ``client.max_examples``), pfl-research's ``K``; the paper takes one ``K``
  for all. A client that takes no step keeps ``c_i`` and sends
  ``Delta c_i = 0``.
* (12) is computed as ``Delta c_i = (x - y_i) / (K_i eta_l) - c`` and
  ``c_i+ = c_i + Delta c_i``: the same quantity, so that the ``Delta c_i``
  the server sums is exactly the one the client applied.
* (16)-(17), the model: ``Delta x`` is FedAvg's aggregate of the deltas
  (:func:`fedjax_kd.algorithms.fed_avg.fedavg_step`; example-weighted unless
  ``uniform_weighting``), fed to ``server_optimizer`` as the pseudo-gradient
  ``-Delta x``, and the optimizer's update is multiplied by ``server_lr``
  (``eta_g``): ``x <- x + eta_g * ServerOpt(Delta x)``. ``server_optimizer =
  optax.sgd(1.0)`` is the paper's ``x <- x + eta_g Delta x``.
* (16)-(17), the control: ``c <- c + (1/N) sum_{i in S} Delta c_i``, the
  uniform mean of the paper (and pfl-research: ``cohort_size /
  population``), whatever ``uniform_weighting`` says.

Deviations from the paper (no official code exists), each an argument:

* ``uniform_weighting=False``: ``Delta x`` weights client ``i`` by its
  examples ``n_i / sum_S n_j``, as the library's FedAvg; the paper's line
  (16) is the uniform mean, ``uniform_weighting=True``.
* ``server_optimizer``: any optax optimizer on the pseudo-gradient; the
  paper's rule is ``sgd(1.0)`` with ``server_lr = eta_g``. (In the
  experiment layer ``eta_g`` is ``server.lr`` with ``server.optimizer=sgd``;
  the builder's ``server_lr`` stays 1 there.)
* ``client_optimizer``: SCAFFOLD's analysis is for SGD. With another
  optimizer the corrected gradient ``g - c_i + c`` is what the optimizer
  sees (momentum accumulates it, Adam normalizes it), and option II's
  ``(x - y_i) / (K_i eta_l)`` is the client's mean *update direction* per
  unit of ``eta_l`` rather than its mean gradient: with momentum ``beta`` it
  grows towards ``1 / (1 - beta)`` times the mean corrected gradient, so the
  corrections are inflated by up to that factor, and with Adam it is a
  preconditioned direction of another scale than the gradients it corrects.
  Neither is analysed in the paper.
* Option I (``c_i+ = g_i(x)``, one extra pass over the client's data) is not
  implemented.

Communication per cohort client and round, counted from the arrays: downlink
``x`` and ``c`` (twice the params' bytes), uplink ``Delta y_i``, ``Delta c_i``
and the float32 aggregation weight (twice the params' bytes plus 4).

Per-client state: the ``c_i`` are a :class:`~fedjax_kd.cohort.ClientStore`
of ``num_clients`` rows (row = client id) in :class:`ScaffoldState`, so they
are checkpointed with the run; the round trains its clients chunk by chunk
(``client_chunk_size``) through ``fedavg_step``'s store, gathering and
scattering each chunk's rows.
"""

from __future__ import annotations

import functools
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
from fedjax_kd.compress import tree_bytes
from fedjax_kd.data.federated import check_cohort
from fedjax_kd.spec import AlgorithmSpec, BuildContext
from fedjax_kd.types import ClientOutput, FederatedAlgorithm, Params, PyTree


class ScaffoldState(NamedTuple):
    """Server state of :func:`scaffold`.

    Attributes:
      params: the global model ``x``.
      opt_state: the server optimizer's state (of ``server_optimizer``
        chained with the ``server_lr`` scaling).
      control: the server control variate ``c`` (the params' shapes).
      client_controls: every client's control variate ``c_i``, a
        :class:`~fedjax_kd.cohort.ClientStore` of ``num_clients`` rows (row =
        client id; on a real deployment row ``i`` lives on client ``i``).
    """

    params: Params
    opt_state: PyTree
    control: Params
    client_controls: ClientStore


def corrected_gradient(correction: Params) -> optax.GradientTransformation:
    """The gradient transform ``g -> g + correction`` (SCAFFOLD's ``g - c_i + c``).

    Chained ahead of the client optimizer with ``correction = c - c_i``, so
    that the optimizer steps on the corrected gradient (line 10 of the
    paper's Algorithm 1 when the optimizer is SGD). Stateless.
    """

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(jnp.add, updates, correction), state

    return optax.GradientTransformation(init, update)


def control_delta(delta: Params, local_steps: jax.Array, control: Params, client_lr) -> Params:
    """Option II's ``Delta c_i = c_i+ - c_i = (x - y_i) / (K_i eta_l) - c``.

    Args:
      delta: the client's ``x - y_i`` (``ClientOutput.delta``).
      local_steps: ``K_i``, the optimizer steps the client took (int scalar).
      control: the server control variate ``c`` the client received.
      client_lr: the client step size ``eta_l`` (may be traced).

    Returns:
      ``Delta c_i`` (the params' shapes); zeros when ``K_i = 0`` (a client
      that took no step keeps its ``c_i``).
    """
    took_steps = local_steps > 0
    denominator = jnp.maximum(local_steps, 1).astype(jnp.float32) * client_lr

    def one(d, c):
        return jnp.where(took_steps, d / denominator - c, jnp.zeros_like(c))

    return jax.tree.map(one, delta, control)


def scaffold(
    model,
    *,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    num_clients: int,
    client_lr,
    server_lr=1.0,
    uniform_weighting: bool = False,
) -> FederatedAlgorithm:
    """Builds SCAFFOLD with option II control variates (see the module docstring).

    Args:
      model: the global model (pure ``init``/``apply``).
      client_optimizer: optax optimizer of the local steps; it steps on the
        corrected gradient ``g - c_i + c``. ``optax.sgd(client_lr)`` is the
        paper's.
      server_optimizer: optax optimizer on the pseudo-gradient ``-Delta x``
        (``sgd(1.0)``: the paper's rule).
      epochs: local epochs ``E`` per round.
      batch_size: local minibatch size ``B``.
      num_clients: the population ``N`` (rows of the control-variate store,
        and the denominator of the server control's update).
      client_lr: the local step size ``eta_l`` of option II's
        ``(x - y_i) / (K_i eta_l)``; the learning rate of
        ``client_optimizer``.
      server_lr: the global step size ``eta_g``, multiplying the server
        optimizer's update.
      uniform_weighting: ``Delta x`` as the uniform mean of the cohort's
        deltas (the paper's line 16) instead of weighted by examples.

    Returns:
      A :class:`~fedjax_kd.types.FederatedAlgorithm` over a
      :class:`ScaffoldState`; its ``round`` reads the clients' rows of the
      store from the cohort's ids, and its metrics add ``control_norm``
      (``||c||`` after the round) to FedAvg's.

    Example::

      algo = scaffold(model, client_optimizer=optax.sgd(0.1),
                      server_optimizer=optax.sgd(1.0), epochs=5, batch_size=10,
                      num_clients=100, client_lr=0.1)
    """
    check_client_state_builder("scaffold", num_clients, epochs, batch_size)
    if isinstance(client_lr, (int, float)) and client_lr <= 0:
        raise ValueError(f"scaffold needs client_lr (eta_l) > 0, got {client_lr}")
    # x <- x + eta_g * ServerOpt(Delta x): the scaling follows the optimizer.
    server = optax.chain(server_optimizer, optax.scale(server_lr))

    def client_update(
        params, x, y, count, key, targets=None, num_epochs=None, *, state, control
    ) -> ClientOutput:
        correction = jax.tree.map(jnp.subtract, control, state)  # c - c_i
        local = make_client_update(
            model.apply,
            optax.chain(corrected_gradient(correction), client_optimizer),
            epochs=epochs,
            batch_size=batch_size,
        )
        out = local(params, x, y, count, key, targets, num_epochs=num_epochs)
        dc = control_delta(out.delta, out.metrics["local_steps"], control, client_lr)
        return out._replace(state=jax.tree.map(jnp.add, state, dc))

    def init(key: jax.Array) -> ScaffoldState:
        params = model.init(key)  # the same init key as FedAvg: the same initial model
        zeros = jax.tree.map(jnp.zeros_like, params)
        return ScaffoldState(
            params=params,
            opt_state=server.init(params),
            control=zeros,
            client_controls=ClientStore.zeros(params, num_clients),
        )

    def round_fn(state: ScaffoldState, cohort, key: jax.Array, server_data=None):
        check_cohort(cohort)
        del server_data  # SCAFFOLD uses no server-side data
        check_fixed_cohort(cohort, "scaffold")
        inputs = client_inputs(key, cohort.size)
        inputs["id"] = cohort.ids  # the rows of the clients' control variates
        control = state.control

        def extra_terms(out):
            dc = control_delta(out.delta, out.metrics["local_steps"], control, client_lr)
            return {"control_delta": dc}

        step = fedavg_step(
            state.params,
            state.opt_state,
            cohort,
            inputs,
            client_update=functools.partial(client_update, control=control),
            server_optimizer=server,
            uniform_weighting=uniform_weighting,
            extra_terms=extra_terms,
            store=state.client_controls,
        )
        new_control = jax.tree.map(
            lambda c, s: c + s / num_clients, control, step.sums["control_delta"]
        )
        control_bytes = tree_bytes(control)  # Delta c_i up, c down: the params' bytes
        leaves = jax.tree.leaves(new_control)
        metrics = {
            "train_loss": train_loss(step.sums),
            "uplink_bytes": step.uplink + control_bytes,
            "downlink_bytes": step.downlink + control_bytes,
            "finite": step.finite & aggregate.tree_all_finite(new_control),
            "control_norm": jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in leaves)),
        }
        new_state = ScaffoldState(
            params=step.params,
            opt_state=step.opt_state,
            control=new_control,
            client_controls=step.store,
        )
        return new_state, metrics

    def eval_models(state: ScaffoldState):
        return {"global": (model.apply, state.params)}

    return FederatedAlgorithm(init=init, round=round_fn, eval_models=eval_models)


def _build(ctx: BuildContext) -> FederatedAlgorithm:
    return scaffold(
        ctx.student,
        num_clients=ctx.personal["num_clients"],
        client_lr=ctx.config.client.lr,
        **ctx.common,
    )


#: How the experiment layer builds SCAFFOLD (``algorithm.name=scaffold``; until it
#: is registered, ``fedjax_kd.algorithms.scaffold:SPEC``).
SPEC = AlgorithmSpec(
    name="scaffold",
    help="SCAFFOLD (Karimireddy et al. 2020): control variates c_i (option II) correct "
    "client drift; eta_l = client.lr, eta_g = server.lr (server.optimizer=sgd)",
    build=_build,
    per_client_state=True,
)
