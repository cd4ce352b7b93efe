"""Per-example losses and masked reductions.

Every loss here returns one value per example (shape ``[batch]``); callers
reduce with :func:`masked_mean` so that padded examples contribute exactly
nothing.

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


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy with integer labels, per example.

    Args:
      logits: ``[batch, num_classes]``.
      labels: ``[batch]`` integer class ids.

    Returns:
      ``[batch]`` losses.
    """
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)


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


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``values`` over entries where ``mask`` is true; 0 if none are.

    Padded entries are selected away (``jnp.where``), so they change nothing,
    even when they hold Inf or NaN.
    """
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return total / jnp.maximum(jnp.sum(mask.astype(values.dtype)), 1.0)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example 0/1 correctness of ``argmax(logits)`` as float32."""
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
    """
    num_classes = logits.shape[-1]
    others = jnp.arange(num_classes - 1)[None, :]
    idx = others + (others >= labels[:, None])
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
