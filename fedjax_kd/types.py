"""Shared types: pytrees, apply functions, algorithm values and round outputs.

Everything that crosses a module boundary inside the library is one of these
plain values. States are immutable ``NamedTuple``s rebuilt with ``._replace``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

PyTree = Any
Params = PyTree
#: ``apply(params, x) -> logits``; ``x`` is a batch ``[B, *feature_shape]``.
ApplyFn = Callable[[Params, jax.Array], jax.Array]


class ClientOutput(NamedTuple):
    """What one client sends back after local training.

    Attributes:
      delta: ``global_params - local_params`` (the client's pseudo-gradient).
      weight: aggregation weight; the number of real local examples.
      metrics: scalar metrics of the local run (e.g. ``train_loss``).
      state: the client's new per-client state (a row of a
        :class:`~fedjax_kd.cohort.ClientStore`, e.g. FedKD's private mentor);
        None for clients that keep none.
    """

    delta: Params
    weight: jax.Array
    metrics: Mapping[str, jax.Array]
    state: PyTree = None


class ServerState(NamedTuple):
    """Server state of FedAvg-style algorithms.

    Attributes:
      params: global model parameters.
      opt_state: the server optimizer's state.
    """

    params: Params
    opt_state: PyTree


class FederatedAlgorithm(NamedTuple):
    """A federated algorithm as a value of pure functions.

    Attributes:
      init: ``init(key) -> state``; builds the initial server state.
      round: ``round(state, cohort, key, server_data=None) -> (state,
        metrics)``; one communication round over the round's
        :class:`fedjax_kd.data.Cohort` only (the sampled ids ``Cohort.ids``
        and a gather function that fetches their data chunk by chunk; wrap
        arrays gathered by hand with ``Cohort.from_data``); ``server_data``
        is a dict with the server-side arrays (``proxy_x`` when the dataset
        has a proxy set). Must be a pure function of its arguments so it can
        be ``jax.jit``-compiled.
        ``metrics`` is a dict of scalars including ``train_loss``,
        ``uplink_bytes``, ``downlink_bytes`` and ``finite`` (whether the
        aggregate update was finite).
      eval_models: ``eval_models(state) -> {name: (apply_fn, params)}``; the
        models to evaluate on the test set. The first entry is the headline
        model reported as ``test_accuracy``. ``apply_fn`` may return logits
        with extra leading axes (``[M, B, C]`` for M per-client models); the
        accuracy and loss are then averaged over those models.
      sample_cohort: optional ``sample_cohort(key, num_clients, k) -> ids``
        replacing uniform sampling (e.g. stratified by architecture group),
        or returning a :class:`fedjax_kd.privacy.SampledCohort` (a
        variable-size cohort padded with a mask: Poisson sampling).
      client_update: optional, for algorithms whose clients all run one
        :func:`fedjax_kd.client.make_client_update` function (FedAvg, FedProx,
        FedNTD, teacher_student): that very function, so that baselines (the
        benchmark's per-client loop) run exactly the algorithm's local update.
      host_metrics: optional ``host_metrics(round) -> {name: float}``:
        metrics known on the host from the number of rounds run alone (DP's
        ``dp_epsilon``), added to every evaluation record and to the
        summary; it must not depend on traced hyperparameters.
    """

    init: Callable[[jax.Array], PyTree]
    round: Callable[..., tuple[PyTree, dict[str, jax.Array]]]
    eval_models: Callable[[PyTree], Mapping[str, tuple[ApplyFn, Params]]]
    sample_cohort: Callable[[jax.Array, int, int], jax.Array] | None = None
    client_update: Callable[..., Any] | None = None
    host_metrics: Callable[[int], dict] | None = None
