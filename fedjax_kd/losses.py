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

    Padded entries are multiplied by exactly zero, so they change nothing.
    """
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example 0/1 correctness of ``argmax(logits)`` as float32."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
