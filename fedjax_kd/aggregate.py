"""Aggregation of client outputs and the server's optimizer step.

FedAvg (McMahan et al., AISTATS 2017, arXiv 1602.05629) averages client
updates weighted by their number of examples; adaptive federated optimization
(Reddi et al., ICLR 2021, arXiv 2003.00295) feeds that average, the
pseudo-gradient ``delta = global - mean(client)``, to a server optimizer.

Output DP for distillation (:func:`clip_output`, :data:`OUTPUT_DP_STREAM`,
:func:`check_private_outputs`; Sources: ``shared/REFERENCES_NEXT.md`` A4):
what clients publish (logits, soft labels, per-label tables) is clipped per
client, summed, noised once and divided by the cohort size, as DP-FedAvg does
with updates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_kd import privacy
from fedjax_kd.data.federated import Cohort, check_cohort
from fedjax_kd.types import Params, PyTree

#: ``fold_in`` stream of a round's key for the Gaussian noise on the outputs
#: its clients publish (output DP; :func:`clip_output`). Distinct from every
#: other stream of the algorithms that use it (``fed_avg.DP_STREAM`` = 0xD9,
#: the straggler, attack and codec streams, and the small per-phase ones).
OUTPUT_DP_STREAM = 0xD10


def weighted_mean(stacked: PyTree, weights: jax.Array) -> PyTree:
    """``sum_k w_k x_k / sum_k w_k`` over the leading (client) axis of every leaf.

    Args:
      stacked: pytree whose leaves are ``[K, ...]``.
      weights: ``[K]`` non-negative weights (e.g. example counts); if they sum
        to 0 the result is 0. Rows of weight 0 are selected away, so their
        values (even NaN or Inf: a non-participant's update) change nothing.

    Returns:
      Pytree of the leaves' weighted means (client axis removed).
    """
    keep = weights > 0
    weights = weights.astype(jnp.float32)
    total = jnp.maximum(jnp.sum(weights), jnp.finfo(jnp.float32).tiny)

    def one(x):
        x = jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 1)), x, 0)
        return jnp.tensordot(weights, x, axes=1) / total

    return jax.tree.map(one, stacked)


def divide(tree: PyTree, total: jax.Array) -> PyTree:
    """``tree / total`` leaf-wise, 0 where ``total`` is 0 (no client had data)."""
    total = jnp.maximum(total.astype(jnp.float32), jnp.finfo(jnp.float32).tiny)
    return jax.tree.map(lambda x: x / total, tree)


def client_weights(counts: jax.Array, *, uniform: bool = False) -> jax.Array:
    """Aggregation weights: example counts (FedAvg), or 1 per non-empty client."""
    counts = counts.astype(jnp.float32)
    return (counts > 0).astype(jnp.float32) if uniform else counts


def tree_all_finite(tree: PyTree) -> jax.Array:
    """True iff every element of every leaf is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def server_update(
    params: Params,
    opt_state: optax.OptState,
    delta: Params,
    optimizer: optax.GradientTransformation,
) -> tuple[Params, optax.OptState]:
    """Applies the server optimizer to the pseudo-gradient ``delta``.

    With ``optax.sgd(1.0)`` this sets ``params`` to the clients' weighted mean.
    """
    updates, opt_state = optimizer.update(delta, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def fedavg_contribution(out, *, uniform: bool = False) -> dict:
    """One client's terms of the FedAvg sums, for :func:`sum_over_clients`.

    ``weighted_delta = w * delta`` and ``weight = w`` (example count, or 1 with
    ``uniform``), plus ``loss_sum`` and ``examples`` for the example-weighted
    train loss. Divide the summed ``weighted_delta`` by the summed ``weight``
    (:func:`divide`) for the aggregate.
    """
    w = client_weights(out.weight, uniform=uniform)
    return {
        "weighted_delta": jax.tree.map(lambda d: w * d, out.delta),
        "weight": w,
        "loss_sum": out.weight * out.metrics["train_loss"],
        "examples": out.weight,
    }


def clip_output(block: jax.Array, clip_norm: float, keep) -> tuple[jax.Array, jax.Array]:
    """One client's published block under output DP: 0 unless ``keep``, clipped to norm ``S``.

    The block (logits or soft labels on the public set, a per-label table) is
    flattened as a whole: its Frobenius norm is bounded by ``clip_norm``
    (:func:`fedjax_kd.privacy.clip_update`), so adding or removing one client
    moves the cohort's sum by at most ``S`` and replacing one by ``2 S``, as
    for DP-FedAvg's updates. Summed over the cohort, noised once with
    :func:`fedjax_kd.privacy.noised_mean` and divided by the fixed cohort
    size, this is the Gaussian mechanism on the published outputs (Sources:
    ``shared/REFERENCES_NEXT.md`` A4, "DP for output sharing and
    distillation"; DP-FedAvg, McMahan et al., ICLR 2018, arXiv 1710.06963).

    Args:
      block: one client's outputs, any shape.
      clip_norm: ``S``.
      keep: bool scalar; False (no data, a padding row, a dropped straggler)
        uploads zeros, whatever ``block`` holds (even NaN).

    Returns:
      ``(clipped block, float32 1.0 if it was clipped else 0.0)``.
    """
    block = jnp.where(keep, block, jnp.zeros_like(block))
    clipped, norm = privacy.clip_update(block, clip_norm)
    return clipped, (norm > clip_norm).astype(jnp.float32)


def check_private_outputs(
    algorithm: str,
    output_dp: privacy.DP | None,
    dp: privacy.DP | None = None,
    num_groups: int = 1,
) -> None:
    """Raises ValueError for output DP (and DP-FedAvg) settings a distillation builder refuses.

    Both settings are checked by :func:`fedjax_kd.privacy.check_dp`; adaptive
    clipping is not implemented for them here; and with either one, more
    than one architecture group is refused: group-stratified sampling
    (``K / G`` clients of each group) is not the uniform sampling of ``K``
    of ``N`` clients the accountant describes.
    """
    for name, setting in (("output_dp", output_dp), ("dp", dp)):
        if setting is None:
            continue
        privacy.check_dp(setting)
        if getattr(setting, "adaptive", None) is not None:
            raise ValueError(f"{algorithm}: adaptive clipping is not implemented for {name}")
        if num_groups > 1:
            raise ValueError(
                f"{algorithm}: {name} needs one architecture group, got {num_groups}: "
                "group-stratified cohorts are not the uniform sampling of K of N clients "
                "the privacy accountant describes"
            )


def ensemble_contribution(
    apply_fn, global_params: Params, out, proxy_x: jax.Array, clip_norm: float | None = None
) -> dict:
    """One client's local model's logits on the proxy set (FedDF-style ensemble).

    Sum over clients and divide ``proxy_logits`` by ``members`` for the mean
    logits of the clients that had data.

    With ``clip_norm`` (output DP, :func:`clip_output`) the ``[P, C]``
    logits block is clipped to Frobenius norm ``clip_norm`` (zero for a
    client without data) and ``output_clipped`` (1.0 if it was clipped) is
    added; the caller then adds noise to the summed ``proxy_logits`` and
    divides by the cohort size instead of ``members``. Without it the terms
    are exactly those of plain FedDF.
    """
    has_data = (out.weight > 0).astype(jnp.float32)
    local = jax.tree.map(jnp.subtract, global_params, out.delta)
    if clip_norm is None:
        return {"proxy_logits": has_data * apply_fn(local, proxy_x), "members": has_data}
    logits, clipped = clip_output(apply_fn(local, proxy_x), clip_norm, out.weight > 0)
    return {"proxy_logits": logits, "members": has_data, "output_clipped": clipped}


def _chunk_layout(cohort: Cohort, inputs: PyTree):
    """How a cohort of K clients splits into chunks of ``cohort.chunk_size``.

    Returns ``(chunk, num_chunks, rows, valid, padded_inputs)``: ``chunk`` is
    rounded up to a multiple of ``cohort.multiple``; ``rows`` ``[num_chunks *
    chunk]`` are cohort rows, the padding ones (``valid`` False) repeating row
    0; ``padded_inputs`` is ``inputs`` extended the same way.
    """
    k = cohort.size
    chunk = min(cohort.chunk_size or k, k)
    chunk = -(-chunk // cohort.multiple) * cohort.multiple
    num_chunks = -(-k // chunk)
    total = num_chunks * chunk
    rows = jnp.arange(total)
    valid = rows < k
    rows = jnp.where(valid, rows, 0)
    padded = jax.tree.map(
        lambda a: jnp.concatenate([a, jnp.broadcast_to(a[:1], (total - k, *a.shape[1:]))]),
        inputs,
    )
    return chunk, num_chunks, rows, valid, padded


def masked_sum(tree: PyTree, valid: jax.Array) -> PyTree:
    """``sum_k tree[k]`` over the rows where ``valid`` (bool ``[C]``) holds, leaf-wise."""

    def one(a):
        mask = valid.reshape(valid.shape + (1,) * (a.ndim - 1))
        return jnp.sum(jnp.where(mask, a, 0), axis=0)

    return jax.tree.map(one, tree)


def sum_over_clients(fn, cohort: Cohort, keys: PyTree) -> PyTree:
    """``sum_k fn(client_k, keys[k])`` over a cohort, in chunks of bounded memory.

    The map-reduce at the heart of every FedAvg-style round: ``fn`` trains one
    client and returns its contributions (e.g. ``w_k * delta_k`` and ``w_k``);
    only their running sum is kept. Clients of a chunk (``cohort.chunk_size``)
    are ``jax.vmap``-ped together; chunks follow each other in
    :func:`scan_over_chunks`, so peak memory grows with the chunk, not with
    the cohort. Rows that pad the cohort to whole chunks (or to a multiple of
    the device count) are dummies whose contributions are masked out.

    Args:
      fn: ``fn(client: ClientData with x [N, ...], y [N], count [], key) ->
        pytree of arrays`` (no client axis).
      cohort: the round's :class:`fedjax_kd.data.Cohort`.
      keys: ``[K]`` per-client keys (the same keys whatever the chunking), or
        any pytree of per-client arrays with leading axis ``K`` (e.g. keys and
        each client's epoch budget), passed to ``fn`` as its second argument.

    Returns:
      The pytree of sums over the K real clients.
    """

    def chunk_fn(carry, clients, keys_c, valid):
        return carry, masked_sum(jax.vmap(fn)(clients, keys_c), valid), {}

    return scan_over_chunks(chunk_fn, cohort, keys, (), scan_one=False)[1]


def scan_over_chunks(fn, cohort: Cohort, inputs: PyTree, carry: PyTree, *, scan_one: bool = True):
    """Runs ``fn`` over a cohort's chunks in order, threading ``carry`` through them.

    The one chunk loop of the library: :func:`sum_over_clients`, the FedAvg
    family's server side (``fed_avg.fedavg_step``, which also threads FedKD's
    per-client store) and the personal-model family's passes all run on it.
    The cohort is processed ``cohort.chunk_size`` clients at a time (a
    ``lax.scan`` over chunks, so peak memory grows with the chunk); ``fn``
    sees a whole chunk and the carry (e.g. the per-client store it gathers
    from and scatters into), and its sums are added up chunk after chunk
    (a running sum in the scan's carry, starting from zeros).

    Args:
      fn: ``fn(carry, clients, inputs_c, valid) -> (carry, sums, per_client)``
        for one chunk: ``clients`` a ClientData ``[C, N, ...]`` whose padding
        rows (``valid`` False; they repeat row 0 with ``count`` 0) must not
        change the carry, ``inputs_c`` the chunk's rows of ``inputs``;
        ``sums`` a pytree already summed over the chunk's valid rows,
        ``per_client`` a pytree with leading axis ``C``.
      cohort: the round's :class:`fedjax_kd.data.Cohort`.
      inputs: pytree of per-client arrays with leading axis ``K`` (keys, ...).
      carry: the initial carry.
      scan_one: with False, a cohort that fits in one chunk (no
        ``chunk_size``, or one ``>= K``) runs ``fn`` once, without a
        ``lax.scan``: an unchunked round is then the same straight-line
        program as one written for the whole cohort.

    Returns:
      ``(carry, sums over all chunks, per_client [K, ...])``.
    """
    check_cohort(cohort)
    k = cohort.size
    chunk, num_chunks, rows, valid, padded = _chunk_layout(cohort, inputs)
    total = num_chunks * chunk

    def step(carry, rows_c, valid_c, inputs_c):
        data = cohort.gather(rows_c)
        data = data._replace(count=jnp.where(valid_c, data.count, 0))
        return fn(carry, data, inputs_c, valid_c)

    if num_chunks == 1 and not scan_one:
        carry, sums, per_client = step(carry, rows, valid, padded)
        return carry, sums, jax.tree.map(lambda a: a[:k], per_client)
    xs = (
        rows.reshape(num_chunks, chunk),
        valid.reshape(num_chunks, chunk),
        jax.tree.map(lambda a: a.reshape(num_chunks, chunk, *a.shape[1:]), padded),
    )
    first = jax.tree.map(lambda a: a[0], xs)
    sums_shape = jax.eval_shape(lambda c, *x: step(c, *x)[1], carry, *first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)

    def body(acc, xs_c):
        carry, running = acc
        carry, sums, per_client = step(carry, *xs_c)
        return (carry, jax.tree.map(jnp.add, running, sums)), per_client

    (carry, sums), per_client = jax.lax.scan(body, (carry, zeros), xs)
    per_client = jax.tree.map(lambda a: a.reshape(total, *a.shape[2:])[:k], per_client)
    return carry, sums, per_client
