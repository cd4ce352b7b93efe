"""DS-FL: soft labels on shared unlabeled data, sharpened by entropy reduction.

Itahara, Nishio, Koda, Morikura & Yamamoto, "Distillation-Based
Semi-Supervised Federated Learning for Communication-Efficient Collaborative
Training with Non-IID Private Data", IEEE Transactions on Mobile Computing
(2021), arXiv 2008.06180.

Every client keeps its own model across rounds (only model outputs are
exchanged, so architectures may differ). One round, for the sampled cohort of
``K`` clients, in the paper's order (update, prediction, aggregation,
distillation):

1. Update: client ``k`` trains on its private data with cross-entropy
   (``epochs`` epochs of ``batch_size``, ``client_optimizer``).
2. Prediction: the server draws ``public_size`` examples ``x_j`` of its
   unlabeled open (proxy) set with the round key and sends their indices;
   client ``k`` sends its soft labels ``p_k(x_j) = softmax(f_k(x_j))``.
3. Aggregation with entropy reduction (ERA):
   ``q(x_j) = softmax(mean_k p_k(x_j) / T)``, ``T = era_temperature = 0.1``
   (``aggregation="mean"`` sends the plain average, the paper's ablation).
   The mean is over the clients holding data (empty dummy clients get weight 0).
4. Distillation: client ``k`` trains on ``(x_j, q(x_j))`` with the soft
   cross-entropy ``-sum_c q_c log softmax(f_k(x_j))_c`` averaged over the
   batch (``distill_epochs`` epochs of ``distill_batch_size``,
   ``distill_optimizer``). With ``server_model`` given, the server also
   distils its own global model on the same pairs, as in the paper, and
   ``eval_models`` reports it as ``server``.

ERA sharpens averages whose clients agree on a leading class, e.g. any mix
``(1 - a) * uniform + a * one_hot`` short of one-hot, which is what non-IID
clients that each know some of the classes produce. It is not an entropy
reducer for every input: ``softmax(p / T)`` lifts the classes where ``p`` is
near zero to ``exp(0) / Z``, so an average whose mass sits on a few classes
(``(0.5, 0.5, 0, ...)``) or an already one-hot one gets *softer* (the largest
possible ratio of two outputs is ``exp(1 / T)``); ``tests/test_ds_fl.py``
checks both.

Choices and deviations:

* ``distill_first=True`` runs prediction, aggregation and distillation before
  the private update, the order in which the method is often summarised. It is
  a rotation of the same cycle, but with partial participation it makes the
  cohort predict with the models of its last participation (or untrained
  ones), so the paper's order is the default. (The DS-FL baseline in the code
  of SCARLET, Azuma, Nishio et al., arXiv 2504.19602, pipelines the two:
  clients distil on the previous round's aggregate, train, then predict for
  the next round.)
* Distillation uses the soft cross-entropy (the table of
  ``shared/REFERENCES.md``); KL to the same targets differs by the targets'
  entropy, a constant, so the gradients are equal.
* The paper uses every client in every round; here a cohort is sampled.
  Optimizer states are fresh in every phase of every round.
* Hyperparameters other than ``T = 0.1`` (open-set size per round, epochs,
  batch sizes) are dataset-specific in the paper; the defaults here are ours.

Communication per client and round: down the subset's indices (int32 ``[P]``)
and the aggregated soft labels (float32 ``[P, C]``); up its soft labels
(float32 ``[P, C]``). Compute per round: ``K * P`` forward passes on the public
subset (``public_forward_examples``) and ``K * P * distill_epochs`` training
examples of distillation (``distill_examples``), plus ``P * distill_epochs``
on the server with a server model (``server_distill_examples``).

Output DP (``output_dp``; Sources: ``shared/REFERENCES_NEXT.md`` A4, "DP for
output sharing and distillation"): each client's soft-label block ``[P, C]``
is clipped to Frobenius norm ``S`` (a softmax block has norm at most
``sqrt(P)``, so ``S >= sqrt(P)`` never clips; a client without data uploads
zeros), the server adds ``N(0, (z S)^2)`` once to the cohort's sum (stream
``aggregate.OUTPUT_DP_STREAM`` of the round key) and divides by the cohort
size ``K`` (fixed denominator). Noise makes that mean's entries negative and
its rows sum to anything, so before ERA (or the plain mean) every row is
projected back onto the probability simplex
(:func:`~fedjax_kd.algorithms.personal.project_rows`): clipped at 0 and
divided by its sum, the ratio estimator of the contributing clients' mean
soft label (exactly the non-private mean without noise and clipping); a row
left with no positive entry becomes uniform (no information). The
projection, ERA, the clients' and the server's distillation are all
post-processing. The round's metrics then hold
``dp_output_clipped_fraction``, the fraction of the ``K`` clients whose
block was clipped.

Memory: a round is two passes over the cohort, ``client_chunk_size`` clients
of one group at a time (:func:`~fedjax_kd.algorithms.personal.cohort_pass`):
the first runs the update and sums the soft labels (steps 1-2; with
``distill_first`` only the soft labels), the second distils and writes each
chunk's models back to their store (step 4; then the update), so memory grows
with the chunk, not with ``K``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_kd import aggregate, losses, privacy
from fedjax_kd.algorithms.personal import (
    PHASE_A,
    PHASE_B,
    SERVER,
    SUBSET,
    check_public_size,
    cohort_pass,
    group_rows,
    group_sampler,
    init_personal_stores,
    make_private_train,
    make_shared_target_train,
    outputs,
    per_client_bytes,
    personal_eval_models,
    project_rows,
    public_hypers,
    public_subset,
    require,
    target_loss,
    upload_mean,
    upload_sums,
)
from fedjax_kd.client import local_train
from fedjax_kd.data.federated import check_cohort
from fedjax_kd.spec import AlgorithmSpec, BuildContext, Hyper, always, positive
from fedjax_kd.types import FederatedAlgorithm, Params

AGGREGATIONS = ("era", "mean")


class DSFLState(NamedTuple):
    """State of :func:`ds_fl`.

    Attributes:
      stores: one personal-model store per architecture group (row ``r`` of
        group ``g`` is client ``g + G * r``).
      server: the server's global model params, or None without a server model.
      round: number of completed rounds (int32 scalar).
    """

    stores: tuple
    server: Params | None
    round: jax.Array


def entropy(probs: jax.Array) -> jax.Array:
    """Shannon entropy (nats) over the last axis; ``0 log 0 = 0``."""
    safe = jnp.where(probs > 0, probs, 1.0)
    return -jnp.sum(jnp.where(probs > 0, probs * jnp.log(safe), 0.0), axis=-1)


def aggregate_soft_labels(
    probs: jax.Array,
    weights: jax.Array,
    *,
    aggregation: str = "era",
    temperature: float = 0.1,
) -> jax.Array:
    """DS-FL's server aggregation of the clients' soft labels.

    Args:
      probs: ``[K, P, C]`` soft labels of K clients on P public examples.
      weights: ``[K]`` client weights (1 for clients with data, 0 for dummies).
      aggregation: ``"era"``: ``softmax(mean / temperature)``; ``"mean"``: the
        weighted mean itself.
      temperature: ERA temperature ``T`` (the paper: 0.1).

    Returns:
      ``[P, C]`` targets.
    """
    mean = upload_mean(upload_sums(probs, weights))
    return targets_from_mean(mean, aggregation=aggregation, temperature=temperature)


def targets_from_mean(mean: jax.Array, *, aggregation: str, temperature: float) -> jax.Array:
    """The targets of :func:`aggregate_soft_labels` from the clients' mean soft labels."""
    if aggregation == "era":
        return losses.entropy_reduction(mean, temperature)
    return mean


def ds_fl(
    models: Sequence,
    *,
    num_clients: int,
    client_optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    public_size: int,
    era_temperature: float = 0.1,
    aggregation: str = "era",
    distill_epochs: int = 1,
    distill_batch_size: int = 64,
    distill_optimizer: optax.GradientTransformation | None = None,
    distill_first: bool = False,
    server_model=None,
    server_optimizer: optax.GradientTransformation | None = None,
    output_dp: privacy.DP | None = None,
) -> FederatedAlgorithm:
    """Builds DS-FL over personal models of one or more architecture groups.

    Args:
      models: one model per architecture group (length 1 = homogeneous).
      num_clients: population size (each client keeps its own model).
      client_optimizer: optax optimizer of the private update.
      epochs: private epochs per round.
      batch_size: private minibatch size.
      public_size: open examples labeled per round (``<=`` the proxy set size).
      era_temperature: ERA temperature ``T > 0``.
      aggregation: ``"era"`` (DS-FL) or ``"mean"`` (plain averaging).
      distill_epochs: epochs over the public subset when distilling.
      distill_batch_size: distillation minibatch size.
      distill_optimizer: clients' distillation optimizer (default: the client
        optimizer).
      distill_first: predict and distil before the private update (see the
        module docstring); default False, the paper's order.
      server_model: optional global model the server distils on the
        aggregated soft labels each round (reported as ``server``).
      server_optimizer: the server model's distillation optimizer (default:
        the distillation optimizer).
      output_dp: optional :class:`fedjax_kd.privacy.DP` on the published soft
        labels (module docstring): clipped blocks, noised sum over the cohort
        size, rows projected back onto the simplex; one architecture group
        only. None: no privacy.

    Returns:
      A :class:`~fedjax_kd.types.FederatedAlgorithm` whose ``round`` needs
      ``server_data["proxy_x"]`` (its clients' ids come with the cohort);
      ``eval_models`` gives ``clients`` (mean over all clients' models), one
      entry per group when there are several, and ``server`` with a server
      model.
    """
    models = tuple(models)
    num_groups = len(models)
    if num_groups < 1 or num_clients < num_groups:
        raise ValueError(f"ds_fl needs >= 1 model and >= {num_groups} clients")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"ds_fl: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if era_temperature <= 0:
        raise ValueError(f"ds_fl: era_temperature must be > 0, got {era_temperature}")
    if min(epochs, batch_size, public_size, distill_epochs, distill_batch_size) < 1:
        raise ValueError("ds_fl: epochs, batch sizes, public_size and distill_epochs must be >= 1")
    aggregate.check_private_outputs("ds_fl", output_dp, num_groups=num_groups)
    distill_optimizer = client_optimizer if distill_optimizer is None else distill_optimizer
    server_optimizer = distill_optimizer if server_optimizer is None else server_optimizer
    private = [
        make_private_train(m.apply, client_optimizer, epochs=epochs, batch_size=batch_size)
        for m in models
    ]
    distil = [
        make_shared_target_train(
            m.apply,
            losses.soft_cross_entropy,
            distill_optimizer,
            epochs=distill_epochs,
            batch_size=distill_batch_size,
        )
        for m in models
    ]

    def init(key: jax.Array) -> DSFLState:
        server = None
        if server_model is not None:
            # Clients use fold_in(key, i) for i < num_clients: a distinct stream.
            server = server_model.init(jax.random.fold_in(key, num_clients))
        return DSFLState(
            stores=init_personal_stores(models, key, num_clients),
            server=server,
            round=jnp.zeros((), jnp.int32),
        )

    def round_fn(state: DSFLState, cohort_data, key: jax.Array, server_data=None):
        check_cohort(cohort_data)
        ids = cohort_data.ids
        proxy_x = require(server_data, "proxy_x", "ds_fl")
        k = ids.shape[0]
        groups = group_rows(ids, num_groups)
        idx, x_pub = public_subset(jax.random.fold_in(key, SUBSET), proxy_x, public_size)
        keys = {
            "train": jax.random.split(jax.random.fold_in(key, PHASE_A), k),
            "distill": jax.random.split(jax.random.fold_in(key, PHASE_B), k),
        }

        def update(g, params, clients, inputs):
            """The private update of a chunk: ``(params, {"train_loss": [c]})``."""
            p, m = private[g](params, clients.x, clients.y, clients.count, inputs["train"])
            return p, {"train_loss": m["train_loss"]}

        def predict(g, params, clients, inputs):  # pass 1: (update,) prediction (uploads)
            out = {}
            if not distill_first:
                params, out = update(g, params, clients, inputs)
            probs = jax.nn.softmax(outputs(models[g], params, x_pub), axis=-1)
            return (None if distill_first else params), out, probs

        dp_args = {}
        if output_dp is not None:  # clipped soft labels, noised sum over K
            dp_key = jax.random.fold_in(key, aggregate.OUTPUT_DP_STREAM)
            dp_args = {"output_dp": output_dp, "dp_key": dp_key}
        stores, first, mean = cohort_pass(
            predict, cohort_data, groups, state.stores, keys, **dp_args
        )
        if output_dp is not None:  # post-processing: rows back onto the simplex
            rows, kept = project_rows(mean)
            mean = jnp.where(kept[..., None], rows, 1.0 / mean.shape[-1])
        targets = targets_from_mean(mean, aggregation=aggregation, temperature=era_temperature)

        def distillation(g, params, clients, inputs):  # pass 2: distillation (, update)
            params, m = distil[g](params, x_pub, targets, inputs["distill"])
            out = {"distill_loss": m["train_loss"]}
            if distill_first:
                params, trained = update(g, params, clients, inputs)
                out |= trained
            return params, out, None

        stores, second, _ = cohort_pass(distillation, cohort_data, groups, stores, keys)
        train_loss = (second if distill_first else first)["train_loss"]

        server = state.server
        extra = {}
        if server_model is not None:
            server, m = local_train(
                target_loss(server_model.apply, losses.soft_cross_entropy),
                state.server,
                server_optimizer,
                {"x": x_pub, "targets": targets},
                jnp.asarray(public_size, jnp.int32),
                jax.random.fold_in(key, SERVER),
                epochs=distill_epochs,
                batch_size=distill_batch_size,
            )
            extra = {
                "server_distill_loss": m["train_loss"],
                "server_distill_examples": jnp.asarray(public_size * distill_epochs, jnp.int32),
            }

        finite = [jnp.all(second["finite"]), jnp.all(jnp.isfinite(targets))]
        if server is not None:
            finite.append(aggregate.tree_all_finite(server))
        metrics = {
            "train_loss": aggregate.weighted_mean(train_loss, second["count"]),
            "distill_loss": jnp.mean(second["distill_loss"]),
            "target_entropy": jnp.mean(entropy(targets)),
            # A client's soft labels have the targets' shape and dtype.
            "uplink_bytes": per_client_bytes(targets, k),
            "downlink_bytes": per_client_bytes((idx, targets), k),
            "finite": jnp.all(jnp.stack(finite)),
            "public_forward_examples": jnp.asarray(k * public_size, jnp.int32),
            "distill_examples": jnp.asarray(k * public_size * distill_epochs, jnp.int32),
            **extra,
        }
        if output_dp is not None:
            metrics["dp_output_clipped_fraction"] = jnp.mean(first["output_clipped"])
        return DSFLState(stores=stores, server=server, round=state.round + 1), metrics

    def eval_models(state: DSFLState):
        entries = personal_eval_models(models, state.stores)
        if server_model is not None:
            entries["server"] = (server_model.apply, state.server)
        return entries

    return FederatedAlgorithm(
        init=init,
        round=round_fn,
        eval_models=eval_models,
        sample_cohort=group_sampler(num_groups),
    )


def _build(ctx: BuildContext) -> FederatedAlgorithm:
    hp = ctx.hp
    check_public_size(hp["public_size"], ctx.dataset)
    return ds_fl(
        ctx.group_models,
        public_size=hp["public_size"],
        era_temperature=hp["temperature"],
        aggregation=hp["aggregation"],
        distill_epochs=hp["public_epochs"],
        distill_batch_size=hp["public_batch_size"],
        output_dp=ctx.robust.get("output_dp"),
        **ctx.personal,
    )


#: How the experiment layer builds DS-FL (``algorithm.name=dsfl``, keys ``dsfl.*``).
SPEC = AlgorithmSpec(
    name="dsfl",
    renamed={
        "algorithm.public_size": "public_size",
        "algorithm.public_epochs": "public_epochs",
        "algorithm.public_batch_size": "public_batch_size",
        "algorithm.era_temperature": "temperature",
        "algorithm.dsfl_aggregation": "aggregation",
    },
    help="DS-FL (Itahara et al. 2020): soft labels on a public subset, entropy-reduction "
    "aggregation",
    build=_build,
    hypers={
        **public_hypers("distillation"),
        "temperature": Hyper(0.1, "entropy-reduction (ERA) temperature T", **positive()),
        "aggregation": Hyper("era", "era (entropy reduction) or mean", choices=("era", "mean")),
    },
    needs_proxy=always,
    groups=True,
    per_client_state=True,
    private_outputs=True,
)
