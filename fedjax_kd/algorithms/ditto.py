"""Ditto: a global model by FedAvg and a personal model per client, tied to it.

Li, Hu, Beirami & Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021, arXiv 2012.04221. Official code
``litian96/ditto@26d9b29``: ``flearn/trainers_MTL/ditto.py`` (the round) and
``flearn/trainers_MTL/fedbase.py`` (initialisation, sampling, averaging);
see ``shared/REFERENCES_NEXT.md``.

Ditto solves, for every client ``k``,

    min_{v_k} h_k(v_k; w*) = F_k(v_k) + (lam / 2) ||v_k - w*||^2,
    w* in argmin_w G(F_1(w), ..., F_N(w))               (G: FedAvg's objective)

with FedAvg as the global solver (the paper's Algorithm 1). One round over a
sampled cohort ``S`` of the ``N`` clients, with ``w^t`` the global model the
clients download:

    (a) w_k   <- ClientUpdate_k(w^t)                    (FedAvg's local update, E epochs)
        client k sends Delta_k = w^t - w_k              (the library's delta sign)
    (b) v_k   <- v_k - eta (grad F_k(v_k; batch) + lam (v_k - w^t))
                                                        personal_epochs epochs of steps
    (c) w^{t+1} <- w^t + ServerOpt(-sum_k p_k Delta_k)  FedAvg's aggregate, p_k = n_k / n

How each line is computed here:

* (a) is :func:`fedjax_kd.client.make_client_update` (no proximal term), so
  the global model's round is FedAvg's exactly: the same client keys
  (:func:`fedjax_kd.algorithms.fed_avg.client_inputs`), the same local
  training, the same aggregation (:func:`fedjax_kd.algorithms.fed_avg.fedavg_step`,
  the library's one chunk loop, with the personal models as its ``store``).
  ``tests/test_ditto.py`` checks it bit for bit against :func:`fed_avg`.
* (b) is :func:`fedjax_kd.client.local_train` (shuffled minibatches of
  ``batch_size``, exact padding) from the client's stored ``v_k`` on the loss
  ``mean CE(v; batch) + (lam / 2) ||v - w^t||^2``, with ``w^t`` held fixed at
  the model downloaded this round (the authors' ``self.global_model``, which
  is only updated after all clients ran). With ``personal_optimizer = sgd(eta)``
  (the default is ``client_optimizer``, fresh state every round) each step is
  the authors' ``eff_grad = grads + lam * (v - w^t); v -= lr * eff_grad``.
  ``lam = 0`` gives purely local models (plain local SGD continued from the
  previous round's ``v_k``); large ``lam`` pulls ``v_k`` to ``w^t``.
* (c) is FedAvg's server step: ``server_optimizer = optax.sgd(1.0)`` is the
  authors' ``global_model += mean(diff)``.
* The personal models are a :class:`~fedjax_kd.cohort.ClientStore` of
  ``num_clients`` rows (row = client id), every row initialised to the global
  model's initialisation (the authors' ``local_models`` are copies of
  ``latest_model``). A client outside the cohort keeps its row unchanged; a
  client never sampled keeps the initialisation.

Deviations from the authors' code, each an argument with a default:

* ``uniform_weighting=False``: the aggregate weights client ``k`` by its
  examples, ``n_k / sum_S n_j``, with clients sampled uniformly (the library's
  FedAvg). The authors sample clients with probability proportional to their
  examples (``--sampling=2`` in their scripts) and take the *uniform* mean
  (``simple_average``); ``uniform_weighting=True`` is their mean (the
  sampling is the experiment layer's, uniform).
* ``shared_batches=True``: the authors run the two updates interleaved, a
  personal step and then a global step on the *same* minibatch, per local
  iteration. Because (a) never reads ``v_k`` and (b) reads only the fixed
  ``w^t``, interleaving equals running (a) and then (b); with
  ``shared_batches`` (b) shuffles with the client's own key, as (a) does, so
  its epoch ``e`` sees the minibatches of (a)'s epoch ``e`` in the same order
  (all of them when ``personal_epochs == epochs``). ``False``: (b) shuffles
  with ``fold_in(key, PERSONAL_STREAM)``, its own order.
* ``personal_epochs`` (default ``epochs``) and ``epochs``: passes over the
  client's data, the library's unit; the authors count ``local_iters``
  minibatch steps (2 in ``run_fashion_clean_ditto_lam1.sh``) from a batch
  stream that runs on across rounds.
* ``personal_optimizer``: any optax optimizer (default ``client_optimizer``);
  the authors' personal step is plain SGD with the client learning rate.
* Not implemented: the authors' ``--dynamic_lam`` (picking ``lam`` in
  ``{0.1, 1, 2}`` per step by a validation loss), their fine-tuning and
  attack options (a Ditto spec with ``robust=True`` would need them).

Communication per cohort client and round: FedAvg's (the global params down;
the delta and one float32 weight up). The personal model never travels.

Evaluation (``eval_models``): ``"personal"`` first, the headline
``test_accuracy``, then ``"global"`` (``global_test_accuracy``; the summary
also has ``personal_test_accuracy``). ``"personal"`` is every client's
personal model on the central test set, their accuracies and losses averaged
over all ``num_clients`` clients, as the personal-model family's headline
(:func:`fedjax_kd.algorithms.personal.personal_eval_models`: FedMD, DS-FL,
FD), so the headlines are comparable; clients never sampled still hold the
initial model and count in the mean. The reason for this order: the global
model is FedAvg's round for round (above), so a ``"global"`` headline would
report a FedAvg run under Ditto's name, while the personal models are what
Ditto adds. A caveat on reading it: the paper scores each personal model on
*its own client's* test data; on the central (pooled) test set a personal
model fitted to a skewed client is measured on other clients' classes too,
so under strong heterogeneity (small Dirichlet alpha) or small ``lam`` the
personal mean can be far below the global model even when each personal
model serves its own client better.

Metrics: ``train_loss`` (the global part, (a): FedAvg's example-weighted mean
local loss), ``personal_train_loss`` (the same mean of (b)'s cross-entropy,
without the ``lam`` term), ``uplink_bytes``, ``downlink_bytes``, ``finite``
(also covers the new personal rows).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_kd import losses
from fedjax_kd.algorithms.fed_avg import (
    check_client_state_builder,
    check_fixed_cohort,
    client_inputs,
    fedavg_step,
    train_loss,
)
from fedjax_kd.client import local_train, make_client_update
from fedjax_kd.cohort import ClientStore
from fedjax_kd.data.federated import check_cohort
from fedjax_kd.spec import AlgorithmSpec, BuildContext, Hyper, at_least
from fedjax_kd.types import ClientOutput, FederatedAlgorithm, Params, PyTree

#: Stream of the personal update's shuffle (``fold_in(client key, PERSONAL_STREAM)``)
#: when ``shared_batches=False``.
PERSONAL_STREAM = 0xD1770


class DittoState(NamedTuple):
    """Server state of :func:`ditto`.

    Attributes:
      params: the global model ``w``.
      opt_state: the server optimizer's state.
      personal: every client's personal model ``v_k``, a
        :class:`~fedjax_kd.cohort.ClientStore` of ``num_clients`` rows (row =
        client id; on a real deployment row ``k`` lives on client ``k``).
    """

    params: Params
    opt_state: PyTree
    personal: ClientStore


def personal_loss(apply_fn, lam):
    """``local_train`` loss of Ditto's personal update, ``w^t`` bound by the caller.

    Returns ``loss_fn(v, batch, valid, global_params) -> (loss, ce_sum)`` with
    ``loss = mean_i CE(v; x_i, y_i) + (lam / 2) ||v - global_params||^2`` over
    the batch's real examples (``lam`` may be traced) and ``ce_sum`` the
    cross-entropy summed over them (the monitoring loss).
    """

    def loss_fn(v, batch, valid, global_params):
        per_example = losses.cross_entropy(apply_fn(v, batch["x"]), batch["y"])
        diff = jax.tree.map(jnp.subtract, v, global_params)
        sq = sum(jnp.sum(jnp.square(d)) for d in jax.tree.leaves(diff))
        loss = losses.masked_mean(per_example, valid) + 0.5 * lam * sq
        return loss, jnp.sum(jnp.where(valid, per_example, 0.0))

    return loss_fn


def ditto(
    model,
    *,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    num_clients: int,
    lam=0.1,
    personal_epochs: int | None = None,
    personal_optimizer: optax.GradientTransformation | None = None,
    shared_batches: bool = True,
    uniform_weighting: bool = False,
) -> FederatedAlgorithm:
    """Builds Ditto with FedAvg as the global solver (see the module docstring).

    Args:
      model: the model of both the global and the personal models (pure
        ``init``/``apply``).
      client_optimizer: optax optimizer of the global model's local update
        (a), fresh every round.
      server_optimizer: optax optimizer on FedAvg's pseudo-gradient
        (``sgd(1.0)``: the authors' ``w += mean delta``).
      epochs: local epochs ``E`` of (a).
      batch_size: local minibatch size of both updates.
      num_clients: the population ``N`` (rows of the personal-model store).
      lam: ``lambda >= 0`` of ``(lam / 2) ||v_k - w^t||^2`` (may be traced);
        0 = purely local personal models.
      personal_epochs: epochs of the personal update (b); None = ``epochs``.
      personal_optimizer: optax optimizer of (b), fresh every round; None =
        ``client_optimizer`` (the authors': SGD at the client learning rate).
      shared_batches: (b) shuffles with the client's key, as (a): the same
        minibatches in the same order (the authors' shared batch per local
        iteration); False = its own stream.
      uniform_weighting: the uniform mean of the cohort's deltas (the
        authors' ``simple_average``) instead of weighted by examples.

    Returns:
      A :class:`~fedjax_kd.types.FederatedAlgorithm` over a
      :class:`DittoState`; its ``round`` reads the clients' rows of the store
      from the cohort's ids, and its ``eval_models`` are ``"personal"`` (the
      headline) and ``"global"``.

    Example::

      algo = ditto(model, client_optimizer=optax.sgd(0.05),
                   server_optimizer=optax.sgd(1.0), epochs=1, batch_size=16,
                   num_clients=100, lam=1.0)
    """
    check_client_state_builder("ditto", num_clients, epochs, batch_size)
    if personal_epochs is None:
        personal_epochs = epochs
    if personal_epochs < 1:
        raise ValueError(f"ditto needs personal_epochs >= 1, got {personal_epochs}")
    if isinstance(lam, (int, float)) and lam < 0:
        raise ValueError(f"ditto needs lam >= 0, got {lam}")
    if personal_optimizer is None:
        personal_optimizer = client_optimizer
    global_update = make_client_update(
        model.apply, client_optimizer, epochs=epochs, batch_size=batch_size
    )
    loss_fn = personal_loss(model.apply, lam)

    def client_update(
        params, x, y, count, key, targets=None, num_epochs=None, *, state
    ) -> ClientOutput:
        out = global_update(params, x, y, count, key, targets, num_epochs=num_epochs)
        personal_key = key if shared_batches else jax.random.fold_in(key, PERSONAL_STREAM)
        personal, personal_metrics = local_train(
            functools.partial(loss_fn, global_params=params),  # w^t: fixed this round
            state,
            personal_optimizer,
            {"x": x, "y": y},
            count,
            personal_key,
            epochs=personal_epochs,
            batch_size=batch_size,
        )
        metrics = {
            **out.metrics,
            "personal_train_loss": personal_metrics["train_loss"],
            "personal_steps": personal_metrics["local_steps"],
        }
        return out._replace(metrics=metrics, state=personal)

    def init(key: jax.Array) -> DittoState:
        params = model.init(key)  # the same init key as FedAvg: the same initial model
        rows = jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients, *a.shape)), params)
        return DittoState(
            params=params,
            opt_state=server_optimizer.init(params),
            personal=ClientStore(jax.tree.map(jnp.array, rows)),
        )

    def extra_terms(out):
        # Example-weighted like FedAvg's loss_sum (aggregate.fedavg_contribution).
        return {"personal_loss_sum": out.weight * out.metrics["personal_train_loss"]}

    def round_fn(state: DittoState, cohort, key: jax.Array, server_data=None):
        check_cohort(cohort)
        del server_data  # Ditto uses no server-side data
        check_fixed_cohort(cohort, "ditto")
        inputs = client_inputs(key, cohort.size)
        inputs["id"] = cohort.ids  # the rows of the clients' personal models
        step = fedavg_step(
            state.params,
            state.opt_state,
            cohort,
            inputs,
            client_update=client_update,
            server_optimizer=server_optimizer,
            uniform_weighting=uniform_weighting,
            extra_terms=extra_terms,
            store=state.personal,
        )
        examples = jnp.maximum(step.sums["examples"], 1.0)
        metrics = {
            "train_loss": train_loss(step.sums),
            "personal_train_loss": step.sums["personal_loss_sum"] / examples,
            "uplink_bytes": step.uplink,
            "downlink_bytes": step.downlink,
            "finite": step.finite,
        }
        new_state = DittoState(params=step.params, opt_state=step.opt_state, personal=step.store)
        return new_state, metrics

    def personal_apply(rows, x):
        return jax.vmap(model.apply, in_axes=(0, None))(rows, x)  # [N, B, C]: averaged

    def eval_models(state: DittoState):
        return {
            "personal": (personal_apply, state.personal.rows),
            "global": (model.apply, state.params),
        }

    return FederatedAlgorithm(init=init, round=round_fn, eval_models=eval_models)


def _build(ctx: BuildContext) -> FederatedAlgorithm:
    hp = ctx.hp
    return ditto(
        ctx.student,
        num_clients=ctx.personal["num_clients"],
        lam=hp["lam"],
        personal_epochs=hp["personal_epochs"] or None,
        shared_batches=hp["shared_batches"],
        **ctx.common,
    )


#: How the experiment layer builds Ditto (``algorithm.name=fedjax_kd.algorithms.ditto:SPEC``
#: until it is registered as ``ditto``; keys ``ditto.*``).
SPEC = AlgorithmSpec(
    name="ditto",
    help="Ditto (Li et al. 2021): FedAvg's global model plus a personal model per client, "
    "pulled to it by (lam/2)||v_k - w||^2; headline = the personal models' mean",
    build=_build,
    hypers={
        "lam": Hyper(0.1, "lambda of (lam/2) ||v_k - w^t||^2 (0: local models)", **at_least(0)),
        "personal_epochs": Hyper(
            0, "epochs of the personal update (0: client.epochs)", **at_least(0)
        ),
        "shared_batches": Hyper(
            True, "the personal update sees the global update's minibatches, in its order"
        ),
    },
    per_client_state=True,
)
