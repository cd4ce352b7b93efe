"""FedMD: heterogeneous clients exchange logits on a public set (digest, then revisit).

Li & Wang, "FedMD: Heterogenous Federated Learning via Model Distillation",
NeurIPS 2019 Workshop on Federated Learning for Data Privacy and
Confidentiality, arXiv 1910.03581; official code ``diogenes0319/FedMD_clean``.

Every client keeps its own model across rounds (no parameters are exchanged,
so the clients' architectures may differ). Each round, for the sampled cohort
of ``K`` clients:

1. The server draws ``public_size`` examples ``x_j`` of its public (proxy) set
   without replacement with the round key and sends their indices.
2. Communicate: client ``k`` sends its logits ``z_k(x_j)`` (``[P, C]``).
3. Aggregate: the consensus ``z~(x_j) = sum_k w_k z_k(x_j) / sum_k w_k`` with
   ``w_k = 1`` for every client holding data (empty dummy clients get 0; the
   official code divides by the number of parties).
4. Digest: client ``k`` trains on ``(x_j, z~(x_j))`` with the L1 logit loss
   ``mean_c |f_k(x_j)_c - z~(x_j)_c|`` (Keras ``mean_absolute_error`` on the
   pre-softmax outputs in the official code), averaged over the batch, for
   ``digest_epochs`` epochs of ``digest_batch_size``; no labels are used.
5. Revisit: client ``k`` trains on its private data with cross-entropy for
   ``epochs`` epochs of ``batch_size``.

Defaults follow the official code where our setting allows: one digest epoch
with batch 256 (``N_logits_matching_round``, ``logits_matching_batchsize``);
the code uses 5000 public examples per round (``N_alignment``) and Keras Adam
with lr 1e-3 for both phases (pass ``optax.adam(1e-3)`` to match); here
``public_size`` is a required argument because the proxy sets of this library
are much smaller, and the digest optimizer defaults to the client optimizer.

Deviations from the paper and its code:

* No transfer-learning warm start. FedMD first trains every model to
  convergence on the *labeled* public set and then on its private data; our
  public set is unlabeled, so the models start from their random
  initialisation and early consensus rounds carry little information.
* Partial participation. FedMD uses all parties every round; here a cohort is
  sampled, so a client's logits come from its model as of its last
  participation (or its initialisation if it has never been sampled).
* Optimizer state is fresh in every phase of every round (the official Keras
  models keep their Adam state across rounds).
* Empty clients (``count == 0``, used as padding) are left out of the consensus.

Output DP (``output_dp``; Sources: ``shared/REFERENCES_NEXT.md`` A4, "DP for
output sharing and distillation"): each client's logits block ``[P, C]`` on
the round's public subset is clipped to Frobenius norm ``S`` (a client
without data uploads zeros), the server adds ``N(0, (z S)^2)`` once to the
cohort's sum (stream ``aggregate.OUTPUT_DP_STREAM`` of the round key) and
divides by the cohort size ``K`` (a fixed denominator, as in DP-FedAvg; with
empty clients in the cohort the consensus shrinks by their share). The
digest on that consensus is post-processing; logits need no projection.
The round's metrics then hold ``dp_output_clipped_fraction``, the fraction
of the ``K`` clients whose block was clipped.

Communication per client and round: down the public subset's indices
(int32 ``[P]``) and the consensus (float32 ``[P, C]``); up the client's logits
(float32 ``[P, C]``). Compute per round: ``K * P`` forward passes on the
public subset (``public_forward_examples``) and ``K * P * digest_epochs``
training examples of the digest (``digest_examples``), on top of the private
training.

Memory: a round is two passes over the cohort, ``client_chunk_size`` clients
of one group at a time (:func:`~fedjax_kd.algorithms.personal.cohort_pass`):
the first sums the clients' logits (steps 2-3), the second digests, revisits
and writes each chunk's models back to their store (steps 4-5), so memory
grows with the chunk, not with ``K``.

Heterogeneous architectures: ``models`` holds one model per group, client
``i`` has the architecture of group ``i % G``, and cohorts are drawn with
:func:`fedjax_kd.cohort.sample_by_group`. The helpers for per-client
("personal") models kept in group stores, shared with DS-FL
(:mod:`~fedjax_kd.algorithms.ds_fl`) and FD (:mod:`~fedjax_kd.algorithms.fd`),
are in :mod:`~fedjax_kd.algorithms.personal`.
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
    public_hypers,
    public_subset,
    require,
    upload_mean,
    upload_sums,
)
from fedjax_kd.data.federated import check_cohort
from fedjax_kd.spec import AlgorithmSpec, BuildContext, always
from fedjax_kd.types import FederatedAlgorithm

# --- FedMD ---


class FedMDState(NamedTuple):
    """State of :func:`fed_md`.

    Attributes:
      stores: one store per architecture group; group ``g``'s leaves are
        ``[n_g, ...]`` and row ``r`` is client ``g + G * r``.
      round: number of completed rounds (int32 scalar).
    """

    stores: tuple
    round: jax.Array


def consensus_logits(logits: jax.Array, weights: jax.Array) -> jax.Array:
    """FedMD's consensus ``sum_k w_k z_k / sum_k w_k`` of logits ``[K, P, C]``; weights ``[K]``."""
    return upload_mean(upload_sums(logits, weights))


def fed_md(
    models: Sequence,
    *,
    num_clients: int,
    client_optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    public_size: int,
    digest_epochs: int = 1,
    digest_batch_size: int = 256,
    digest_optimizer: optax.GradientTransformation | None = None,
    output_dp: privacy.DP | None = None,
) -> FederatedAlgorithm:
    """Builds FedMD over personal models of one or more architecture groups.

    Args:
      models: one model per architecture group (length 1 = homogeneous).
      num_clients: population size (each client keeps its own model).
      client_optimizer: optax optimizer of the revisit phase (private data).
      epochs: revisit epochs on the private data per round.
      batch_size: revisit minibatch size.
      public_size: public examples drawn per round (``<=`` the proxy set size).
      digest_epochs: epochs over the public subset in the digest phase.
      digest_batch_size: digest minibatch size (official code: 256).
      digest_optimizer: optimizer of the digest phase (default: the client
        optimizer).
      output_dp: optional :class:`fedjax_kd.privacy.DP` on the published
        logits (module docstring): clipped blocks, noised sum over the
        cohort size; one architecture group only. None: no privacy.

    Returns:
      A :class:`~fedjax_kd.types.FederatedAlgorithm` whose ``round`` needs
      ``server_data["proxy_x"]`` (its clients' ids come with the cohort);
      ``eval_models`` gives ``clients`` (mean over all clients' models) and,
      with several groups, one entry per group.
    """
    models = tuple(models)
    num_groups = len(models)
    if num_groups < 1 or num_clients < num_groups:
        raise ValueError(f"fed_md needs >= 1 model and >= {num_groups} clients")
    if min(epochs, batch_size, public_size, digest_epochs, digest_batch_size) < 1:
        raise ValueError("fed_md: epochs, batch sizes, public_size and digest_epochs must be >= 1")
    aggregate.check_private_outputs("fed_md", output_dp, num_groups=num_groups)
    digest_optimizer = client_optimizer if digest_optimizer is None else digest_optimizer
    digest = [
        make_shared_target_train(
            m.apply,
            losses.l1_logit_loss,
            digest_optimizer,
            epochs=digest_epochs,
            batch_size=digest_batch_size,
        )
        for m in models
    ]
    revisit = [
        make_private_train(m.apply, client_optimizer, epochs=epochs, batch_size=batch_size)
        for m in models
    ]

    def init(key: jax.Array) -> FedMDState:
        return FedMDState(
            stores=init_personal_stores(models, key, num_clients),
            round=jnp.zeros((), jnp.int32),
        )

    def round_fn(state: FedMDState, cohort_data, key: jax.Array, server_data=None):
        check_cohort(cohort_data)
        ids = cohort_data.ids
        proxy_x = require(server_data, "proxy_x", "fed_md")
        k = ids.shape[0]
        groups = group_rows(ids, num_groups)
        idx, x_pub = public_subset(jax.random.fold_in(key, SUBSET), proxy_x, public_size)
        keys = {
            "digest": jax.random.split(jax.random.fold_in(key, PHASE_A), k),
            "revisit": jax.random.split(jax.random.fold_in(key, PHASE_B), k),
        }

        def communicate(g, params, clients, inputs):  # pass 1: what each client uploads
            return None, {}, outputs(models[g], params, x_pub)

        dp_args = {}
        if output_dp is not None:  # clipped logits, noised sum over K
            dp_key = jax.random.fold_in(key, aggregate.OUTPUT_DP_STREAM)
            dp_args = {"output_dp": output_dp, "dp_key": dp_key}
        _, published, consensus = cohort_pass(
            communicate, cohort_data, groups, state.stores, **dp_args
        )

        def digest_and_revisit(g, params, clients, inputs):  # pass 2
            p, dm = digest[g](params, x_pub, consensus, inputs["digest"])
            p, rm = revisit[g](p, clients.x, clients.y, clients.count, inputs["revisit"])
            return p, {"digest_loss": dm["train_loss"], "train_loss": rm["train_loss"]}, None

        stores, out, _ = cohort_pass(digest_and_revisit, cohort_data, groups, state.stores, keys)
        metrics = {
            "train_loss": aggregate.weighted_mean(out["train_loss"], out["count"]),
            "digest_loss": jnp.mean(out["digest_loss"]),
            # A client's logits have the consensus's shape and dtype.
            "uplink_bytes": per_client_bytes(consensus, k),
            "downlink_bytes": per_client_bytes((idx, consensus), k),
            "finite": jnp.all(jnp.isfinite(consensus)) & jnp.all(out["finite"]),
            "public_forward_examples": jnp.asarray(k * public_size, jnp.int32),
            "digest_examples": jnp.asarray(k * public_size * digest_epochs, jnp.int32),
        }
        if output_dp is not None:
            metrics["dp_output_clipped_fraction"] = jnp.mean(published["output_clipped"])
        return FedMDState(stores=stores, round=state.round + 1), metrics

    def eval_models(state: FedMDState):
        return personal_eval_models(models, state.stores)

    return FederatedAlgorithm(
        init=init,
        round=round_fn,
        eval_models=eval_models,
        sample_cohort=group_sampler(num_groups),
    )


def _build(ctx: BuildContext) -> FederatedAlgorithm:
    hp = ctx.hp
    check_public_size(hp["public_size"], ctx.dataset)
    return fed_md(
        ctx.group_models,
        public_size=hp["public_size"],
        digest_epochs=hp["public_epochs"],
        digest_batch_size=hp["public_batch_size"],
        output_dp=ctx.robust.get("output_dp"),
        **ctx.personal,
    )


#: How the experiment layer builds FedMD (``algorithm.name=fedmd``, keys ``fedmd.*``).
SPEC = AlgorithmSpec(
    name="fedmd",
    renamed={
        "algorithm.public_size": "public_size",
        "algorithm.public_epochs": "public_epochs",
        "algorithm.public_batch_size": "public_batch_size",
    },
    help="FedMD (Li & Wang 2019): personal models exchange logits on a public subset",
    build=_build,
    hypers=public_hypers("digest"),
    needs_proxy=always,
    groups=True,
    per_client_state=True,
    private_outputs=True,
)
