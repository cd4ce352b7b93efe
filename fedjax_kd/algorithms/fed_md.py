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

Communication per client and round: down the public subset's indices
(int32 ``[P]``) and the consensus (float32 ``[P, C]``); up the client's logits
(float32 ``[P, C]``). Compute per round: ``K * P`` forward passes on the
public subset (``public_forward_examples``) and ``K * P * digest_epochs``
training examples of the digest (``digest_examples``), on top of the private
training.

Heterogeneous architectures: ``models`` holds one model per group, client
``i`` has the architecture of group ``i % G``, and cohorts are drawn with
:func:`fedjax_kd.cohort.sample_by_group`. This module also holds the helpers
for per-client ("personal") models kept in group stores, shared with DS-FL
(:mod:`~fedjax_kd.algorithms.ds_fl`) and FD (:mod:`~fedjax_kd.algorithms.fd`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_kd import aggregate, cohort, losses
from fedjax_kd.client import local_train
from fedjax_kd.compress import tree_bytes
from fedjax_kd.types import ApplyFn, FederatedAlgorithm, Params

# Named random streams of a round (fold_in constants on the round's client key).
SUBSET, PHASE_A, PHASE_B, SERVER = 0, 1, 2, 3


# --- Personal models kept in per-group stores (shared by FedMD, DS-FL and FD) ---


def init_personal_stores(models: Sequence, key: jax.Array, num_clients: int) -> tuple:
    """One personal-model store per group, client ``i`` initialised with ``fold_in(key, i)``.

    Client ``i`` is row ``i // G`` of group ``i % G``'s store. Keying the
    initialisation by client id makes a client's initial model independent of
    the number of groups.
    """
    num_groups = len(models)
    stores = []
    sizes = cohort.group_sizes(num_clients, num_groups)
    for g, (model, n) in enumerate(zip(models, sizes, strict=True)):
        ids = g + num_groups * jnp.arange(n)
        # lax.map, not vmap: the same values, and XLA on CPU compiles the vmapped
        # threefry of the initialisers several times slower (init runs once).
        stores.append(jax.lax.map(lambda i, m=model: m.init(jax.random.fold_in(key, i)), ids))
    return tuple(stores)


def require(server_data: dict | None, name: str, algorithm: str) -> jax.Array:
    """``server_data[name]`` or a ValueError that says what is missing."""
    if not server_data or name not in server_data:
        hint = {
            "proxy_x": "a public/proxy set (build the dataset with proxy_fraction > 0)",
            "cohort_ids": "the sampled client ids (simulate.run passes them)",
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

    entries = {"clients": (apply_all, stores)}
    if len(models) > 1:
        for g, m in enumerate(models):
            entries[f"group{g}_{getattr(m, 'name', g)}"] = (stacked(m), stores[g])
    return entries


def group_sampler(num_groups: int) -> Callable | None:
    """``sample_cohort`` drawing ``K / G`` clients per group (None for one group)."""
    if num_groups == 1:
        return None
    return lambda key, n, k: cohort.sample_by_group(key, n, k, num_groups)


def public_subset(key: jax.Array, proxy_x: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """``size`` distinct public examples drawn with ``key``: ``(int32 indices [P], x [P, ...])``."""
    num = proxy_x.shape[0]
    if not 1 <= size <= num:
        raise ValueError(f"public_size={size} must be in [1, {num}] (the size of the proxy set)")
    idx = jax.random.choice(key, num, (size,), replace=False).astype(jnp.int32)
    return idx, proxy_x[idx]


def cross_entropy_loss(apply_fn: ApplyFn) -> Callable:
    """``local_train`` loss: mean cross-entropy on ``batch["x"], batch["y"]``."""

    def loss_fn(params, batch, valid):
        per_example = losses.cross_entropy(apply_fn(params, batch["x"]), batch["y"])
        return losses.masked_mean(per_example, valid), jnp.sum(jnp.where(valid, per_example, 0.0))

    return loss_fn


def target_loss(apply_fn: ApplyFn, per_example: Callable) -> Callable:
    """``local_train`` loss: mean ``per_example(f(batch["x"]), batch["targets"])``."""

    def loss_fn(params, batch, valid):
        values = per_example(apply_fn(params, batch["x"]), batch["targets"])
        return losses.masked_mean(values, valid), jnp.sum(jnp.where(valid, values, 0.0))

    return loss_fn


def make_private_train(apply_fn, optimizer, *, epochs: int, batch_size: int) -> Callable:
    """Vmapped ``(params [k], x [k, N], y [k, N], count [k], keys [k]) -> (params, metrics)``."""

    def one(params, x, y, count, key):
        return local_train(
            cross_entropy_loss(apply_fn),
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


def stacked_outputs(models: Sequence, params: Sequence, x: jax.Array) -> jax.Array:
    """Logits ``[K, P, C]`` of the cohort's models (groups in cohort order) on shared ``x``."""
    return jnp.concatenate(
        [jax.vmap(m.apply, in_axes=(0, None))(p, x) for m, p in zip(models, params, strict=True)]
    )


def per_client_bytes(message, k: int) -> jax.Array:
    """int32 ``[k]``: each client sends or receives ``message`` (one client's arrays)."""
    return jnp.full((k,), tree_bytes(message), jnp.int32)


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
    w = weights.astype(logits.dtype)
    return jnp.tensordot(w, logits, axes=1) / jnp.maximum(jnp.sum(w), 1e-12)


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

    Returns:
      A :class:`~fedjax_kd.types.FederatedAlgorithm` whose ``round`` needs
      ``server_data["proxy_x"]`` and ``server_data["cohort_ids"]``;
      ``eval_models`` gives ``clients`` (mean over all clients' models) and,
      with several groups, one entry per group.
    """
    models = tuple(models)
    num_groups = len(models)
    if num_groups < 1 or num_clients < num_groups:
        raise ValueError(f"fed_md needs >= 1 model and >= {num_groups} clients")
    if min(epochs, batch_size, public_size, digest_epochs, digest_batch_size) < 1:
        raise ValueError("fed_md: epochs, batch sizes, public_size and digest_epochs must be >= 1")
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
        ids = require(server_data, "cohort_ids", "fed_md")
        proxy_x = require(server_data, "proxy_x", "fed_md")
        k = ids.shape[0]
        groups = group_rows(ids, num_groups)
        params = [cohort.gather(s, rows) for s, (_, rows) in zip(state.stores, groups, strict=True)]

        idx, x_pub = public_subset(jax.random.fold_in(key, SUBSET), proxy_x, public_size)
        logits = stacked_outputs(models, params, x_pub)  # what each client uploads
        consensus = consensus_logits(logits, cohort_data.count > 0)

        digest_keys = jax.random.split(jax.random.fold_in(key, PHASE_A), k)
        revisit_keys = jax.random.split(jax.random.fold_in(key, PHASE_B), k)
        stores, digest_loss, train_loss, finite = [], [], [], [jnp.all(jnp.isfinite(consensus))]
        for g, (rows_k, rows_store) in enumerate(groups):
            p, dm = digest[g](params[g], x_pub, consensus, digest_keys[rows_k])
            p, rm = revisit[g](
                p,
                cohort_data.x[rows_k],
                cohort_data.y[rows_k],
                cohort_data.count[rows_k],
                revisit_keys[rows_k],
            )
            stores.append(cohort.scatter(state.stores[g], rows_store, p))
            digest_loss.append(dm["train_loss"])
            train_loss.append(rm["train_loss"])
            finite.append(aggregate.tree_all_finite(p))

        metrics = {
            "train_loss": aggregate.weighted_mean(jnp.concatenate(train_loss), cohort_data.count),
            "digest_loss": jnp.mean(jnp.concatenate(digest_loss)),
            "uplink_bytes": per_client_bytes(logits[0], k),
            "downlink_bytes": per_client_bytes((idx, consensus), k),
            "finite": jnp.all(jnp.stack(finite)),
            "public_forward_examples": jnp.asarray(k * public_size, jnp.int32),
            "digest_examples": jnp.asarray(k * public_size * digest_epochs, jnp.int32),
        }
        return FedMDState(stores=tuple(stores), round=state.round + 1), metrics

    def eval_models(state: FedMDState):
        return personal_eval_models(models, state.stores)

    return FederatedAlgorithm(
        init=init,
        round=round_fn,
        eval_models=eval_models,
        sample_cohort=group_sampler(num_groups),
    )
