"""FD: federated distillation by exchanging per-label mean softmax vectors.

Jeong, Oh, Kim, Park, Bennis & Kim, "Communication-Efficient On-Device Machine
Learning: Federated Distillation and Augmentation under Non-IID Private
Data", NeurIPS 2018 Workshop on Machine Learning on the Phone and other
Consumer Devices (MLPCD), arXiv 1811.11479.

Every client keeps its own model (architectures may differ: only ``C x C``
tables are exchanged). Client ``k`` holds, per label ``l``, the mean softmax
output of its model over its examples of label ``l``:

    F_k[l] = (1 / n_kl) sum_{i: y_i = l} softmax(f_k(x_i)),   n_kl = #{i: y_i = l}

(the paper calls these vectors "logits"; they are softmax outputs). The
server's target for client ``k`` is the average over the OTHER clients:

    F^_k[l] = sum_{j != k} w_jl F_j[l] / sum_{j != k} w_jl

with ``w_jl = n_jl`` (``label_weighting="count"``, the default: ``F^_k[l]`` is
the mean softmax over all other clients' examples of label ``l``) or ``w_jl =
1[n_jl > 0]`` (``"uniform"``: each client holding the label counts once; when
every device holds every label this is FD's ``(sum_j F_j - F_k) / (M - 1)``). Labels
that no other client holds get a zero row: no distillation term. Client ``k``
trains on its private data with

    CE(f_k(x), y) + gamma * CE(softmax(f_k(x)), F^_k[y])

(``CE(p, q) = -sum_c q_c log p_c``, mean over the batch's real examples).

Protocol (FD's: the distillation target of a round is computed from the last
exchange). One round for the sampled cohort:

1. The server sends each cohort client its target table ``F^_k`` computed from
   the uploads it holds: every client's most recent upload made at most
   ``max_staleness`` rounds ago (default 1: the previous round's cohort, FD's
   protocol; ``None``: every client's latest upload), excluding the client's
   own. In round 0 there is none: no distillation term, and no bytes sent.
2. Client ``k`` trains ``epochs`` epochs with the loss above.
3. Client ``k`` computes ``F_k`` and the label counts ``n_k`` with its trained
   model (one forward pass over its data) and uploads them; the server stores
   them with the round number.

Deviations: FD accumulates ``F_k`` as a running mean of the outputs produced
during the local iterations (of a changing model); we compute it with the
final local model in one extra forward pass per private example and round
(``label_stats_forward_examples``), so the uploaded vectors describe the model
the client keeps. FD lets every device take part in every round; here a
cohort is sampled, so targets come from the last ``max_staleness`` rounds'
cohorts. The weighting is an explicit choice (above). Optimizer state is
fresh every round. ``gamma = 1`` is our default.

Communication per client and round: down ``F^_k`` (float32 ``[C, C]``, sent
only when it has a nonzero row); up ``F_k`` (float32 ``[C, C]``) plus, with
count weighting, the label counts (int32 ``[C]``; with uniform weighting the
zero rows of ``F_k`` already mark the labels a client lacks). Compute: the
distillation term reuses the training logits; the uploads cost one forward
pass per private example (``label_stats_forward_examples``).

Output DP (``output_dp``; Sources: ``shared/REFERENCES_NEXT.md`` A4, "DP for
output sharing and distillation"): the server no longer sees any client's
table. Each cohort client's table ``F_k`` (``[C, C]``; Frobenius norm at most
``sqrt(C)``, so ``S >= sqrt(C)`` never clips) is clipped to norm ``S`` (a
client without data uploads zeros), the server adds ``N(0, (z S)^2)`` once
to the cohort's sum (stream ``aggregate.OUTPUT_DP_STREAM`` of the round key)
and divides by the cohort size ``K`` (fixed denominator). Post-processing:
each row ``l`` of that mean is projected back onto the simplex
(:func:`~fedjax_kd.algorithms.personal.project_rows`: clipped at 0, divided
by its sum, which counts the clients holding ``l``), so it estimates the
mean of the holders' rows, each holder counting once (``label_weighting``
must be ``"uniform"``: the label counts are not published); a row whose
noised sum is below half a client (``0.5 / K``: labels nobody held) is zero,
no distillation term. That one table (``dp_table``, made in round
``dp_round``) is every client's target while it is at most
``max_staleness`` rounds old. Deviations this forces: no leave-one-out (a
client that was in the table's cohort distils partly towards its own
upload), and only the latest round's cohort, not each client's latest upload.
Up goes ``F_k`` alone; the round's metrics hold
``dp_output_clipped_fraction``, the fraction of the ``K`` clients whose table
was clipped; ``label_means``, ``label_counts`` and ``upload_round`` stay at
their initial values.

Memory: the targets of a round come from earlier rounds' uploads, so a round
is one pass over the cohort, ``client_chunk_size`` clients of one group at a
time (:func:`~fedjax_kd.algorithms.personal.cohort_pass`): each chunk trains
(step 2), computes its uploads (step 3) and writes its models back to their
store, so memory grows with the chunk, not with ``K``.
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
    cohort_pass,
    group_rows,
    group_sampler,
    init_personal_stores,
    personal_eval_models,
    project_rows,
)
from fedjax_kd.client import local_train, sum_batches
from fedjax_kd.compress import tree_bytes
from fedjax_kd.data.federated import check_cohort
from fedjax_kd.spec import AlgorithmSpec, BuildContext, Hyper, at_least
from fedjax_kd.types import ApplyFn, FederatedAlgorithm

LABEL_WEIGHTINGS = ("count", "uniform")


class FDState(NamedTuple):
    """State of :func:`fd`.

    Attributes:
      stores: one personal-model store per architecture group (row ``r`` of
        group ``g`` is client ``g + G * r``).
      label_means: float32 ``[num_clients, C, C]``, each client's last uploaded
        per-label mean softmax (zero rows for labels it lacks).
      label_counts: int32 ``[num_clients, C]``, the label counts of that upload.
      upload_round: int32 ``[num_clients]``, the round of that upload (-1: none).
      round: number of completed rounds (int32 scalar).
      dp_table: with output DP, float32 ``[C, C]``: the latest private
        target table (module docstring); None without.
      dp_round: with output DP, the round ``dp_table`` was made in (int32
        scalar, -1: none yet); None without.
    """

    stores: tuple
    label_means: jax.Array
    label_counts: jax.Array
    upload_round: jax.Array
    round: jax.Array
    dp_table: jax.Array | None = None
    dp_round: jax.Array | None = None


def per_label_mean_softmax(
    logits: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
    """One client's per-label mean softmax vectors and label counts.

    Args:
      logits: ``[N, C]`` the client's outputs on its examples.
      labels: ``[N]`` integer labels.
      mask: bool ``[N]`` real (non-padded) examples.
      num_classes: ``C``.

    Returns:
      ``(means [C, C], counts int32 [C])``: row ``l`` of ``means`` is the mean
      of ``softmax(logits)`` over the real examples of label ``l`` (zero if
      there are none).
    """
    sums, counts = per_label_softmax_sums(logits, labels, mask, num_classes)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    return means, counts.astype(jnp.int32)


def per_label_softmax_sums(
    logits: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
    """Per-label sums of ``softmax(logits)`` over the real examples, and counts.

    Per-position targets (logits ``[B, T, C]``, labels and ``mask`` ``[B, T]``)
    count every real target position as one example.

    Returns:
      ``(sums [C, C], counts float [C])``; :func:`per_label_mean_softmax`
      divides them.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    labels, mask = labels.reshape(-1), mask.reshape(-1)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype) * mask[:, None]
    # Padded rows are selected away, so that they change nothing even if non-finite.
    probs = jnp.where(mask[:, None], jax.nn.softmax(logits, axis=-1), 0.0)
    return onehot.T @ probs, jnp.sum(onehot, axis=0)


def available_uploads(
    upload_round: jax.Array, current_round: jax.Array, max_staleness: int | None
) -> jax.Array:
    """Bool ``[n]``: clients whose last upload (round ``upload_round``, -1 = none) may be used.

    An upload made in round ``u`` is used in round ``r`` if ``r - u <= max_staleness``
    (None: always).
    """
    available = upload_round >= 0
    if max_staleness is not None:
        available &= upload_round >= current_round - max_staleness
    return available


def leave_one_out_targets(
    label_means: jax.Array,
    label_counts: jax.Array,
    available: jax.Array,
    ids: jax.Array,
    *,
    label_weighting: str = "count",
) -> jax.Array:
    """FD's targets: per label, the weighted average over the OTHER clients' uploads.

    Args:
      label_means: ``[n, C, C]`` uploaded per-label means of all ``n`` clients.
      label_counts: ``[n, C]`` their label counts.
      available: bool ``[n]``, the uploads the server may use.
      ids: int ``[K]`` the clients that receive targets.
      label_weighting: ``"count"`` (weight ``n_jl``) or ``"uniform"`` (weight
        ``1[n_jl > 0]``).

    Returns:
      ``[K, C, C]``: row ``l`` of client ``ids[k]``'s table is
      ``sum_{j != ids[k]} w_jl F_j[l] / sum_{j != ids[k]} w_jl`` over available
      uploads, or zero when that denominator is 0.
    """
    counts = label_counts.astype(label_means.dtype)
    w = counts if label_weighting == "count" else (counts > 0).astype(label_means.dtype)
    w = w * available[:, None].astype(w.dtype)  # [n, C]
    weighted = w[:, :, None] * label_means  # [n, C, C]
    # Totals minus the receiver's own contribution. The weights are small
    # integers, so the denominator is exact and an all-own label gives exactly 0.
    num = jnp.sum(weighted, axis=0)[None] - weighted[ids]
    den = jnp.sum(w, axis=0)[None] - w[ids]
    return jnp.where(den[..., None] > 0, num / jnp.maximum(den, 1.0)[..., None], 0.0)


def fd_loss(apply_fn: ApplyFn, gamma: float):
    """``local_train`` loss: ``CE(f(x), y) + gamma * CE(softmax(f(x)), target)`` per example.

    Monitors the cross-entropy task loss.
    """

    def loss_fn(params, batch, valid):
        logits = apply_fn(params, batch["x"])
        task = losses.cross_entropy(logits, batch["y"])
        per_example = task + gamma * losses.soft_cross_entropy(logits, batch["targets"])
        return losses.masked_mean(per_example, valid), jnp.sum(jnp.where(valid, task, 0.0))

    return loss_fn


def fd(
    models: Sequence,
    *,
    num_clients: int,
    num_classes: int,
    client_optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    gamma: float = 1.0,
    label_weighting: str = "count",
    max_staleness: int | None = 1,
    output_dp: privacy.DP | None = None,
) -> FederatedAlgorithm:
    """Builds FD over personal models of one or more architecture groups.

    Args:
      models: one model per architecture group (length 1 = homogeneous).
      num_clients: population size (each client keeps its own model).
      num_classes: number of labels ``C`` (the tables are ``C x C``).
      client_optimizer: optax optimizer of local training.
      epochs: local epochs per round.
      batch_size: local minibatch size.
      gamma: weight of the distillation term (>= 0; 0 = independent training).
      label_weighting: ``"count"`` or ``"uniform"`` (see the module docstring).
      max_staleness: use uploads made at most this many rounds ago (>= 1;
        1 = the previous round's, FD's protocol); None = every latest upload.
      output_dp: optional :class:`fedjax_kd.privacy.DP` on the published
        tables (module docstring): clipped tables, noised sum over the cohort
        size, rows projected onto the simplex, one shared target table;
        needs ``label_weighting="uniform"`` and one architecture group.
        None: no privacy.

    Returns:
      A :class:`~fedjax_kd.types.FederatedAlgorithm` whose ``round`` reads
      its clients' ids from the cohort; ``eval_models`` gives ``clients`` (mean
      over all clients' models) and, with several groups, one entry per group.
    """
    models = tuple(models)
    num_groups = len(models)
    if num_groups < 1 or num_clients < num_groups:
        raise ValueError(f"fd needs >= 1 model and >= {num_groups} clients")
    if label_weighting not in LABEL_WEIGHTINGS:
        raise ValueError(f"fd: label_weighting must be one of {LABEL_WEIGHTINGS}")
    if gamma < 0 or num_classes < 1 or min(epochs, batch_size) < 1:
        raise ValueError("fd needs gamma >= 0, num_classes >= 1, epochs and batch_size >= 1")
    if max_staleness is not None and max_staleness < 1:
        raise ValueError(f"fd: max_staleness must be >= 1 or None, got {max_staleness}")
    aggregate.check_private_outputs("fd", output_dp, num_groups=num_groups)
    if output_dp is not None and label_weighting != "uniform":
        raise ValueError(
            "fd: output_dp needs label_weighting='uniform': the server sees only the noised "
            "sum of the tables, in which every client holding a label counts once (the label "
            "counts are not published)"
        )

    def make_train(apply_fn):
        def one(params, x, y, targets, count, key):
            return local_train(
                fd_loss(apply_fn, gamma),
                params,
                client_optimizer,
                {"x": x, "y": y, "targets": targets},
                count,
                key,
                epochs=epochs,
                batch_size=batch_size,
            )

        return jax.vmap(one)

    def make_stats(apply_fn):
        def one(params, x, y, count):
            # Per-label sums block by block in the training batch's shape, so that
            # they do not depend on the padding (client.sum_batches).
            def block_sums(block, valid):
                return per_label_softmax_sums(
                    apply_fn(params, block["x"]), block["y"], valid, num_classes
                )

            sums, counts = sum_batches(block_sums, {"x": x, "y": y}, count, batch_size=batch_size)
            return sums / jnp.maximum(counts, 1.0)[:, None], counts.astype(jnp.int32)

        return jax.vmap(one)

    train = [make_train(m.apply) for m in models]
    stats = [make_stats(m.apply) for m in models]

    def init(key: jax.Array) -> FDState:
        dp_state = {}
        if output_dp is not None:
            dp_state = {
                "dp_table": jnp.zeros((num_classes, num_classes), jnp.float32),
                "dp_round": jnp.full((), -1, jnp.int32),
            }
        return FDState(
            stores=init_personal_stores(models, key, num_clients),
            label_means=jnp.zeros((num_clients, num_classes, num_classes), jnp.float32),
            label_counts=jnp.zeros((num_clients, num_classes), jnp.int32),
            upload_round=jnp.full((num_clients,), -1, jnp.int32),
            round=jnp.zeros((), jnp.int32),
            **dp_state,
        )

    def round_fn(state: FDState, cohort_data, key: jax.Array, server_data=None):
        check_cohort(cohort_data)
        ids = cohort_data.ids
        k = ids.shape[0]
        groups = group_rows(ids, num_groups)
        if output_dp is None:
            available = available_uploads(state.upload_round, state.round, max_staleness)
            tables = leave_one_out_targets(
                state.label_means,
                state.label_counts,
                available,
                ids,
                label_weighting=label_weighting,
            )  # [K, C, C], what the server sends
        else:  # the latest private table, the same for every client, while fresh enough
            fresh = available_uploads(state.dp_round, state.round, max_staleness)
            table = jnp.where(fresh, state.dp_table, 0.0)
            tables = jnp.broadcast_to(table, (k, num_classes, num_classes))
        keys = jax.random.split(jax.random.fold_in(key, PHASE_A), k)

        # One pass: the targets come from earlier rounds' uploads, not this round's.
        def train_and_upload(g, params, clients, inputs):
            # Per-example targets: the row of each example's label.
            targets = jax.vmap(lambda t, y: t[y])(inputs["table"], clients.y)  # [c, N, C]
            x, y, count = clients.x, clients.y, clients.count
            p, m = train[g](params, x, y, targets, count, inputs["key"])
            f, n = stats[g](p, x, y, count)
            upload = None if output_dp is None else f  # with output DP: clipped, noised sum
            return p, {"train_loss": m["train_loss"], "means": f, "counts": n}, upload

        dp_args = {}
        if output_dp is not None:  # clipped tables, noised sum over K
            dp_key = jax.random.fold_in(key, aggregate.OUTPUT_DP_STREAM)
            dp_args = {"output_dp": output_dp, "dp_key": dp_key}
        inputs = {"table": tables, "key": keys}
        stores, out, noised = cohort_pass(
            train_and_upload, cohort_data, groups, state.stores, inputs, **dp_args
        )
        if output_dp is not None:
            # Post-processing: rows back onto the simplex; labels held by less
            # than half a client (noise only) get no target.
            dp_table, _ = project_rows(noised, min_total=0.5 / k)
        means, counts = out["means"], out["counts"]

        upload = (means[0], counts[0]) if label_weighting == "count" else means[0]
        # A table is sent only if it has a row (rows with data are softmax means, != 0).
        received = jnp.any(tables != 0, axis=(1, 2))
        metrics = {
            "train_loss": aggregate.weighted_mean(out["train_loss"], out["count"]),
            "uplink_bytes": jnp.full((k,), tree_bytes(upload), jnp.int32),
            "downlink_bytes": jnp.where(received, tree_bytes(tables[0]), 0).astype(jnp.int32),
            "finite": jnp.all(out["finite"]) & jnp.all(jnp.isfinite(means)),
            "label_stats_forward_examples": jnp.sum(out["count"]).astype(jnp.int32),
        }
        if output_dp is not None:
            metrics["finite"] = metrics["finite"] & jnp.all(jnp.isfinite(dp_table))
            metrics["dp_output_clipped_fraction"] = jnp.mean(out["output_clipped"])
            # The server keeps no client's table: only the private aggregate.
            new_state = state._replace(
                stores=stores, round=state.round + 1, dp_table=dp_table, dp_round=state.round
            )
            return new_state, metrics
        new_state = FDState(
            stores=stores,
            label_means=state.label_means.at[ids].set(means),
            label_counts=state.label_counts.at[ids].set(counts),
            upload_round=state.upload_round.at[ids].set(state.round),
            round=state.round + 1,
        )
        return new_state, metrics

    def eval_models(state: FDState):
        return personal_eval_models(models, state.stores)

    return FederatedAlgorithm(
        init=init,
        round=round_fn,
        eval_models=eval_models,
        sample_cohort=group_sampler(num_groups),
    )


def _build(ctx: BuildContext) -> FederatedAlgorithm:
    return fd(
        ctx.group_models,
        num_classes=ctx.dataset.num_classes,
        gamma=ctx.hp["gamma"],
        # Output DP publishes no label counts: every holder of a label counts once.
        label_weighting="count" if ctx.robust.get("output_dp") is None else "uniform",
        output_dp=ctx.robust.get("output_dp"),
        **ctx.personal,
    )


#: How the experiment layer builds FD (``algorithm.name=fd``, keys ``fd.*``).
SPEC = AlgorithmSpec(
    name="fd",
    renamed={"algorithm.fd_gamma": "gamma"},
    help="FD (Jeong et al. 2018): distillation to the other clients' per-label mean softmax",
    build=_build,
    hypers={"gamma": Hyper(1.0, "weight gamma of the distillation term", **at_least(0))},
    groups=True,
    per_client_state=True,
    private_outputs=True,
)
