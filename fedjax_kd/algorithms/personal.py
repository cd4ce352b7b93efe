"""Shared pieces of the personal-model family: FedMD, DS-FL and FD.

These algorithms exchange no parameters: every client keeps its own model
across rounds in a per-group store (client ``i`` is row ``i // G`` of group
``i % G``'s store), trains it on private data, and talks to the server through
outputs on a shared public set (FedMD, DS-FL) or per-label statistics (FD).
This module holds the store, grouping, training and accounting helpers they
share; each algorithm's own equations stay in its file.

Rounds run in passes over the cohort (:func:`cohort_pass`): within each
group, ``cohort.chunk_size`` clients at a time are gathered with their
personal params, trained under ``vmap`` and scattered back, chunks following
each other in a ``lax.scan``, so memory grows with the chunk, not with the
cohort (without a chunk size each group is one chunk). A round whose server
aggregate depends on this round's uploads (FedMD, DS-FL) takes two passes:
the first sums the uploads over the chunks, the second hands their mean to
every chunk. FD's targets come from earlier rounds' uploads: one pass.

Output DP (Sources: ``shared/REFERENCES_NEXT.md`` A4, "DP for output sharing
and distillation"), written once for the three: :func:`cohort_pass` with
``output_dp`` clips every client's upload inside its chunk, sums the clipped
uploads and adds the Gaussian noise once to the sum, divided by the cohort
size; :func:`project_rows` turns a noised mean of probability rows back into
probabilities (DS-FL's soft labels, FD's tables).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from fedjax_kd import aggregate, cohort, losses, privacy
from fedjax_kd.client import local_train
from fedjax_kd.cohort import ClientStore, group_sampler  # noqa: F401 - group_sampler: re-exported
from fedjax_kd.compress import tree_bytes
from fedjax_kd.spec import Hyper, at_least
from fedjax_kd.types import ApplyFn, Params

# Named random streams of a round (fold_in constants on the round's client key).
SUBSET, PHASE_A, PHASE_B, SERVER = 0, 1, 2, 3


def init_personal_stores(models: Sequence, key: jax.Array, num_clients: int) -> tuple:
    """One :class:`~fedjax_kd.cohort.ClientStore` per group, client ``i`` from ``fold_in(key, i)``.

    Client ``i`` is row ``i // G`` of group ``i % G``'s store. Keying the
    initialisation by client id makes a client's initial model independent of
    the number of groups.
    """
    num_groups = len(models)
    sizes = cohort.group_sizes(num_clients, num_groups)
    return tuple(
        ClientStore.create(model.init, key, g + num_groups * jnp.arange(n))
        for g, (model, n) in enumerate(zip(models, sizes, strict=True))
    )


def require(server_data: dict | None, name: str, algorithm: str) -> jax.Array:
    """``server_data[name]`` or a ValueError that says what is missing."""
    if not server_data or name not in server_data:
        hint = {
            "proxy_x": "a public/proxy set (build the dataset with proxy_fraction > 0)",
        }[name]
        raise ValueError(f"{algorithm} needs server_data[{name!r}]: {hint}")
    return server_data[name]


def group_rows(ids: jax.Array, num_groups: int) -> list[tuple[slice, jax.Array]]:
    """Per group: the cohort rows (a slice) and the rows of the group's store.

    The cohort must be ordered by group with ``K / G`` clients each, as
    :func:`fedjax_kd.cohort.sample_by_group` returns it; client ``i`` is row
    ``i // G`` of group ``i % G``'s store.
    """
    k = ids.shape[0]
    if k % num_groups:
        raise ValueError(f"a cohort of {k} clients cannot be split into {num_groups} groups")
    per = k // num_groups
    return [
        (slice(g * per, (g + 1) * per), ids[g * per : (g + 1) * per] // num_groups)
        for g in range(num_groups)
    ]


def personal_eval_models(models: Sequence, stores: tuple) -> dict[str, tuple[ApplyFn, Params]]:
    """``eval_models`` entries for every client's personal model.

    The headline ``clients`` returns logits ``[num_clients, B, C]`` (the groups
    concatenated), so the evaluation averages over all clients' models; with
    several groups, ``group{g}_{name}`` averages over one group's clients.
    """

    def stacked(model):
        return jax.vmap(model.apply, in_axes=(0, None))

    def apply_all(all_stores, x):
        return jnp.concatenate(
            [stacked(m)(s, x) for m, s in zip(models, all_stores, strict=True)], axis=0
        )

    rows = tuple(store.rows for store in stores)
    entries = {"clients": (apply_all, rows)}
    if len(models) > 1:
        for g, m in enumerate(models):
            entries[f"group{g}_{getattr(m, 'name', g)}"] = (stacked(m), rows[g])
    return entries


def public_subset(key: jax.Array, proxy_x: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """``size`` distinct public examples drawn with ``key``: ``(int32 indices [P], x [P, ...])``."""
    num = proxy_x.shape[0]
    if not 1 <= size <= num:
        raise ValueError(f"public_size={size} must be in [1, {num}] (the size of the proxy set)")
    idx = jax.random.choice(key, num, (size,), replace=False).astype(jnp.int32)
    return idx, proxy_x[idx]


def _cross_entropy_loss(apply_fn: ApplyFn) -> Callable:
    """``local_train`` loss: mean cross-entropy on ``batch["x"], batch["y"]``."""

    def loss_fn(params, batch, valid):
        per_example = losses.cross_entropy(apply_fn(params, batch["x"]), batch["y"])
        return losses.masked_mean(per_example, valid), jnp.sum(jnp.where(valid, per_example, 0.0))

    return loss_fn


def target_loss(apply_fn: ApplyFn, per_example: Callable) -> Callable:
    """``local_train`` loss: mean ``per_example(f(batch["x"]), batch["targets"])``."""

    def loss_fn(params, batch, valid):
        values = per_example(apply_fn(params, batch["x"]), batch["targets"])
        return losses.masked_mean(values, valid), losses.masked_sum(values, valid)

    return loss_fn


def make_private_train(apply_fn, optimizer, *, epochs: int, batch_size: int) -> Callable:
    """Vmapped ``(params [k], x [k, N], y [k, N], count [k], keys [k]) -> (params, metrics)``."""

    def one(params, x, y, count, key):
        return local_train(
            _cross_entropy_loss(apply_fn),
            params,
            optimizer,
            {"x": x, "y": y},
            count,
            key,
            epochs=epochs,
            batch_size=batch_size,
        )

    return jax.vmap(one)


def make_shared_target_train(
    apply_fn, per_example: Callable, optimizer, *, epochs: int, batch_size: int
) -> Callable:
    """Vmapped ``(params [k], x [P], targets [P, C], keys [k]) -> (params, metrics)``.

    Every client trains on the same public inputs and targets (the consensus).
    """

    def one(params, x, targets, key):
        return local_train(
            target_loss(apply_fn, per_example),
            params,
            optimizer,
            {"x": x, "targets": targets},
            jnp.asarray(x.shape[0], jnp.int32),
            key,
            epochs=epochs,
            batch_size=batch_size,
        )

    return jax.vmap(one, in_axes=(0, None, None, 0))


def outputs(model, params: Params, x: jax.Array) -> jax.Array:
    """Logits ``[k, P, C]`` of ``k`` stacked personal models on shared ``x`` ``[P, ...]``."""
    return jax.vmap(model.apply, in_axes=(0, None))(params, x)


def upload_sums(uploads: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
    """``{"sum": sum_k w_k u_k, "weight": sum_k w_k}`` of uploads ``[k, ...]``, weights ``[k]``.

    Sums add over chunks of a cohort; :func:`upload_mean` turns them into the mean.
    """
    w = weights.astype(uploads.dtype)
    return {"sum": jnp.tensordot(w, uploads, axes=1), "weight": jnp.sum(w)}


def upload_mean(sums: dict[str, jax.Array]) -> jax.Array:
    """``sum_k w_k u_k / sum_k w_k`` from :func:`upload_sums` (0 when no weight)."""
    return sums["sum"] / jnp.maximum(sums["weight"], 1e-12)


def project_rows(noisy_mean: jax.Array, min_total: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Probability rows back from a noised mean of probability rows (output DP's post-processing).

    Each row ``r`` of ``noisy_mean`` (last axis ``C``) estimates
    ``sum_k u_k / K`` for clipped probability rows ``u_k``: noise can make
    entries negative and rows sum to anything. The projection clips the row at
    0 (a probability cannot be negative) and divides it by its sum: the row
    sum of the clients' sum counts the contributing clients (each row of a
    softmax sums to 1, or less once clipped), so dividing by it is the ratio
    estimator of their mean, and without noise or clipping it gives back
    exactly the mean over the clients that contributed (the aggregate of the
    algorithm without DP). Post-processing of a DP release costs no privacy.

    Args:
      noisy_mean: ``[..., C]``.
      min_total: a row is kept only when its own sum (before clipping,
        ``(contributors + noise) / K``) exceeds this (FD: half a client, so
        that labels nobody held do not become noise targets) and it has a
        positive entry.

    Returns:
      ``(rows, kept)``: ``rows`` ``[..., C]`` are distributions where ``kept``
      (bool ``[...]``) and zero elsewhere; the caller decides what a row that
      is not kept becomes.
    """
    positive = jnp.maximum(noisy_mean, 0.0)
    total = jnp.sum(positive, axis=-1, keepdims=True)
    kept = (jnp.sum(noisy_mean, axis=-1) > min_total) & (total[..., 0] > 0)
    rows = jnp.where(kept[..., None], positive / jnp.where(total > 0, total, 1.0), 0.0)
    return rows, kept


def cohort_pass(
    fn: Callable,
    cohort,
    groups: list,
    stores: tuple,
    inputs: dict | None = None,
    *,
    output_dp: privacy.DP | None = None,
    dp_key: jax.Array | None = None,
):
    """One pass over the cohort, group by group and chunk by chunk.

    Each group's rows of the cohort (a contiguous slice, see :func:`group_rows`)
    go through :func:`fedjax_kd.aggregate.scan_over_chunks`:
    ``cohort.chunk_size`` clients at a time (all of the group's without a chunk
    size, padded to ``cohort.multiple`` rows), their personal params
    gathered from the group's store, ``fn`` run on the chunk, and the params it
    returns scattered back. Padding rows of the last chunk (``count`` 0,
    repeating the chunk layout's row 0) write nowhere and upload nothing.

    Args:
      fn: ``fn(g, params, clients, inputs_c) -> (params, per_client, upload)``
        for a chunk of ``c`` clients of group ``g`` (vmap inside): ``params``
        ``[c, ...]`` from the store, ``clients`` a ClientData ``[c, N, ...]``,
        ``inputs_c`` the chunk's rows of ``inputs``. The returned ``params``
        go back to the store (None: the store is left as it is),
        ``per_client`` is a dict of ``[c, ...]`` arrays, and ``upload`` (or
        None) ``[c, ...]`` is each client's message to the server.
      cohort: the round's :class:`fedjax_kd.data.Cohort`, ordered by group.
      groups: :func:`group_rows` of the cohort's ids.
      stores: one :class:`~fedjax_kd.cohort.ClientStore` per group.
      inputs: dict of per-client arrays ``[K, ...]`` (keys, targets), or None.
      output_dp: optional :class:`fedjax_kd.privacy.DP` on the uploads
        (output DP; Sources: ``shared/REFERENCES_NEXT.md`` A4): each
        client's whole upload is clipped to Frobenius norm
        ``output_dp.clip_norm`` inside its chunk
        (:func:`fedjax_kd.aggregate.clip_output`; a client without data or a
        padding row uploads zeros), the clipped uploads are summed over the
        chunks and groups, Gaussian noise of std ``z S`` is added once to the
        sum (key ``dp_key``) and the sum is divided by the cohort size ``K``
        (:func:`fedjax_kd.privacy.noised_mean`: a fixed denominator, every
        client counts once, with or without data). None: the plain mean,
        exactly as without the argument.
      dp_key: the round's key of that noise (with ``output_dp``).

    Returns:
      ``(stores, per_client, mean_upload)``: ``per_client`` holds ``fn``'s
      per-client arrays ``[K, ...]`` in cohort order plus ``count`` (the
      clients' examples), when ``fn`` returns params ``finite`` (whether
      they are finite), and with ``output_dp`` ``output_clipped`` (float32,
      1.0 where the upload was clipped); ``mean_upload`` is the mean upload
      of the clients holding data (``count > 0``; with ``output_dp`` the
      noised sum over ``K``), or None when ``fn`` uploads nothing. With a
      chunk size (or ``output_dp``) the mean comes from a running sum over the
      chunks; without, from the ``[K, ...]`` uploads stacked in cohort order.
    """
    if output_dp is not None and dp_key is None:
        raise ValueError("cohort_pass with output_dp needs the round's dp_key")
    chunked = bool(cohort.chunk_size)
    inputs = {} if inputs is None else inputs
    new_stores, outs, sums = [], [], []
    for g, ((rows_k, rows_store), store) in enumerate(zip(groups, stores, strict=True)):

        def chunk_fn(store, clients, inputs_c, valid, g=g):
            params, per_client, upload = fn(
                g, store.gather(inputs_c["row"]), clients, inputs_c["in"]
            )
            per_client = {**per_client, "count": clients.count}
            if params is not None:
                per_client["finite"] = jax.vmap(aggregate.tree_all_finite)(params)
                store = store.scatter(inputs_c["row"], params, valid)  # padding rows: nowhere
            chunk_sums = {}
            if upload is not None and output_dp is not None:
                keep = valid & (clients.count > 0)

                def clip(block, keep_k):
                    return aggregate.clip_output(block, output_dp.clip_norm, keep_k)

                clipped, per_client["output_clipped"] = jax.vmap(clip)(upload, keep)
                chunk_sums = {"sum": jnp.sum(clipped, axis=0)}  # padding rows are zeros
            elif upload is not None and chunked:
                mask = valid.reshape(valid.shape + (1,) * (upload.ndim - 1))
                chunk_sums = upload_sums(jnp.where(mask, upload, 0), valid & (clients.count > 0))
            elif upload is not None:
                per_client["upload"] = upload
            return store, chunk_sums, per_client

        group_inputs = {"row": rows_store, "in": {n: v[rows_k] for n, v in inputs.items()}}
        store, group_sums, out = aggregate.scan_over_chunks(
            chunk_fn, cohort.slice(rows_k.start, rows_k.stop), group_inputs, store, scan_one=False
        )
        new_stores.append(store)
        outs.append(out)
        sums.append(group_sums)
    per_client = jax.tree.map(lambda *a: jnp.concatenate(a), *outs)
    mean = None
    if output_dp is not None and sums[0]:
        total = sum((group_sums["sum"] for group_sums in sums[1:]), sums[0]["sum"])
        mean = privacy.noised_mean(total, dp_key, output_dp, cohort.size)
    elif "upload" in per_client:
        mean = upload_mean(upload_sums(per_client.pop("upload"), per_client["count"] > 0))
    elif sums[0]:
        mean = upload_mean(jax.tree.map(lambda *a: sum(a[1:], a[0]), *sums))
    return tuple(new_stores), per_client, mean


def per_client_bytes(message, k: int) -> jax.Array:
    """int32 ``[k]``: each client sends or receives ``message`` (one client's arrays)."""
    return jnp.full((k,), tree_bytes(message), jnp.int32)


def check_public_size(public_size: int, dataset) -> None:
    """Raises ValueError unless ``public_size`` fits the dataset's proxy set (FedMD, DS-FL)."""
    num_proxy = 0 if dataset.proxy_x is None else len(dataset.proxy_x)
    if public_size > num_proxy:
        raise ValueError(
            f"public_size must be <= the {num_proxy} proxy examples (data.proxy_fraction), "
            f"got {public_size}"
        )


def public_hypers(phase: str) -> dict:
    """The public-set hyperparameters FedMD and DS-FL share (``phase``: digest / distillation)."""
    return {
        "public_size": Hyper(128, "public (proxy) examples drawn per round", **at_least(1)),
        "public_epochs": Hyper(1, f"{phase} epochs over the public subset", **at_least(1)),
        "public_batch_size": Hyper(32, f"{phase} minibatch size", **at_least(1)),
    }
