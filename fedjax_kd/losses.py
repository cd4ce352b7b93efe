"""Per-example losses and masked reductions.

Every loss here returns one value per example (shape ``[batch]``); callers
reduce with :func:`masked_mean` so that padded examples contribute exactly
nothing.

Next-token tasks have per-position targets: logits ``[batch, T, C]`` against
labels ``[batch, T]``, where a label below 0 (:data:`NO_TARGET`) marks a
position without a target (padding after a short sequence). Every loss here
keeps such leading axes (``[batch, T]`` values), and :func:`target_mask` turns
the ``[batch]`` mask of real examples into the ``[batch, T]`` mask of real
targets, so :func:`masked_mean` gives the mean over non-padding tokens: the
same number as flattening the positions into ``batch * T`` examples.

Distillation follows Hinton, Vinyals & Dean, "Distilling the Knowledge in a
Neural Network" (arXiv 1503.02531): soft targets ``softmax(z_t / T)`` and the
soft term multiplied by ``T**2`` so its gradient scale does not depend on T.
The per-example KL averaged over real examples equals PyTorch's
``KLDivLoss(reduction='batchmean')``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

#: The label of a position without a target (labels ``< 0`` carry no loss).
NO_TARGET = -1


def target_mask(labels: jax.Array, valid: jax.Array) -> jax.Array:
    """The bool mask of real targets: ``valid`` broadcast to ``labels``, and ``labels >= 0``.

    Args:
      labels: ``[batch]`` class ids, or ``[batch, T]`` per-position targets
        (:data:`NO_TARGET` where a position has none).
      valid: bool ``[batch]`` real examples (padded ones are False).

    Returns:
      bool of ``labels``' shape: for ``[batch]`` labels (never negative) this
      is ``valid`` itself.
    """
    expand = valid.reshape(valid.shape + (1,) * (labels.ndim - valid.ndim))
    return expand & (labels >= 0)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy with integer labels, per example (or per position).

    Args:
      logits: ``[batch, num_classes]`` (or ``[batch, T, num_classes]``).
      labels: ``[batch]`` integer class ids (or ``[batch, T]``; a negative
        label gives a finite value that :func:`target_mask` masks away).

    Returns:
      ``[batch]`` (or ``[batch, T]``) losses.
    """
    safe = jnp.maximum(labels, 0)
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, safe)


def distillation_loss(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """``T**2 * KL(softmax(teacher/T) || softmax(student/T))`` per example.

    No gradient flows into the teacher (``stop_gradient``).

    Args:
      student_logits: ``[batch, num_classes]``.
      teacher_logits: ``[batch, num_classes]``.
      temperature: softmax temperature ``T > 0``.

    Returns:
      ``[batch]`` losses (reduce with :func:`masked_mean` for ``batchmean``).
    """
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    log_p_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_p_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    kl = optax.losses.kl_divergence_with_log_targets(log_p_s, log_p_t)
    return temperature**2 * kl


def _expand(mask: jax.Array, values: jax.Array) -> jax.Array:
    """``mask`` with trailing axes to broadcast against ``values`` (``[B]`` to ``[B, T]``)."""
    mask = mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim))
    return jnp.broadcast_to(mask, values.shape)


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of ``values`` over entries where ``mask`` is true (see :func:`masked_mean`)."""
    return jnp.sum(jnp.where(_expand(mask, values), values, 0.0))


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``values`` over entries where ``mask`` is true; 0 if none are.

    Padded entries are selected away (``jnp.where``), so they change nothing,
    even when they hold Inf or NaN. A ``[B]`` mask against per-position values
    ``[B, T]`` (inputs without targets, e.g. a public set of sequences)
    counts every position of a real example.
    """
    mask = _expand(mask, values)
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return total / jnp.maximum(jnp.sum(mask.astype(values.dtype)), 1.0)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example (or per-position) 0/1 correctness of ``argmax(logits)`` as float32."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def soft_cross_entropy(logits: jax.Array, target_probs: jax.Array) -> jax.Array:
    """``-sum_c p_c log softmax(logits)_c`` per example, targets held fixed.

    Used by FD (Jeong et al. 2018, arXiv 1811.11479) and DS-FL (Itahara et al.,
    arXiv 2008.06180) to train on soft labels.
    """
    target_probs = jax.lax.stop_gradient(target_probs)
    return -jnp.sum(target_probs * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def l1_logit_loss(logits: jax.Array, target_logits: jax.Array) -> jax.Array:
    """Mean absolute difference of logits per example (FedMD's digest loss).

    Li & Wang, "FedMD", arXiv 1910.03581, train on the consensus with Keras'
    ``mean_absolute_error``: the mean over classes.
    """
    return jnp.mean(jnp.abs(logits - jax.lax.stop_gradient(target_logits)), axis=-1)


def not_true_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Drops each example's true-class logit: ``[B, C] -> [B, C - 1]``.

    The remaining classes keep their order (FedNTD's ``refine_as_not_true``).
    Per-position logits ``[B, T, C]`` with labels ``[B, T]`` give ``[B, T, C - 1]``.
    """
    num_classes = logits.shape[-1]
    others = jnp.arange(num_classes - 1)
    idx = others + (others >= labels[..., None])
    return jnp.take_along_axis(logits, idx, axis=-1)


def not_true_distillation_loss(
    student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, tau: float = 1.0
) -> jax.Array:
    """FedNTD's ``tau^2 KL(softmax(t~/tau) || softmax(s~/tau))`` per example.

    ``~`` drops the true class (Lee et al., "Preservation of the Global Knowledge
    by Not-True Distillation in Federated Learning", NeurIPS 2022, arXiv
    2106.03097). No gradient flows into the teacher.
    """
    return distillation_loss(
        not_true_logits(student_logits, labels), not_true_logits(teacher_logits, labels), tau
    )


def entropy_reduction(probs: jax.Array, temperature: float) -> jax.Array:
    """DS-FL's entropy reduction aggregation: ``softmax(probs / T)`` (T = 0.1 there)."""
    return jax.nn.softmax(probs / temperature, axis=-1)
