"""On-device image augmentation of the clients' training data, reproducible from keys.

The two augmentations of the FL papers' CIFAR and EMNIST setups (FedDF,
Lin et al. 2020; Reddi et al., "Adaptive Federated Optimization", 2021;
both as in He et al.'s CIFAR ResNet training): a random crop of the
original size from the image zero-padded by ``padding`` pixels on each side
(``padding = 4`` for 32x32 CIFAR), and a horizontal flip with probability
1/2.

Where it runs: inside the compiled round, on each sampled client's gathered
data (:meth:`fedjax_kd.data.Cohort.from_store`), with the key
``fold_in(fold_in(round_key, AUGMENT), client_id)``, so a run stays
reproducible and no other randomness moves. A client's examples are
augmented once per round: with several local epochs, the epochs see the same
augmented copy (centralized training redraws per epoch). Evaluation and the
server's proxy set are never augmented.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["AUGMENTATIONS", "crop_offsets", "make_augment", "random_crop", "random_flip"]

#: The values of ``client.augment``.
AUGMENTATIONS = ("none", "flip", "crop", "crop+flip")


def _as_images(x: jax.Array) -> tuple[jax.Array, bool]:
    """``[N, H, W, C]`` view of ``[N, H, W]`` or ``[N, H, W, C]`` images; whether C was added."""
    if x.ndim == 3:
        return x[..., None], True
    if x.ndim == 4:
        return x, False
    raise ValueError(f"augmentation needs images [N, H, W(, C)], got shape {x.shape}")


def crop_offsets(key: jax.Array, n: int, padding: int) -> jax.Array:
    """Each example's crop corner ``(dy, dx)``, uniform in ``[0, 2 padding]``: int32 ``[n, 2]``."""
    return jax.random.randint(key, (n, 2), 0, 2 * padding + 1, dtype=jnp.int32)


def random_crop(key: jax.Array, x: jax.Array, padding: int) -> jax.Array:
    """Random crops of the original size from ``x`` zero-padded by ``padding`` pixels.

    Args:
      key: the client's augmentation key.
      x: ``[N, H, W]`` or ``[N, H, W, C]`` images of any dtype.
      padding: pixels of zeros added on each side before cropping.

    Returns:
      ``x``'s shape and dtype; example ``i`` is
      ``pad(x[i])[dy:dy + H, dx:dx + W]`` with ``(dy, dx) = crop_offsets(key, N, padding)[i]``.
    """
    if padding == 0:
        return x
    images, added = _as_images(x)
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = crop_offsets(key, n, padding)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    out = jax.vmap(crop)(padded, offsets)
    return out[..., 0] if added else out


def random_flip(key: jax.Array, x: jax.Array) -> jax.Array:
    """Mirrors each image left-right with probability 1/2 (``bernoulli(key, 0.5, [N])``)."""
    images, added = _as_images(x)
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    out = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
    return out[..., 0] if added else out


def make_augment(kind: str, padding: int = 4) -> Callable[[jax.Array, jax.Array], jax.Array] | None:
    """``augment(key, x)`` for one client's ``[N, ...]`` images, or None for ``"none"``.

    Args:
      kind: one of :data:`AUGMENTATIONS`; ``crop+flip`` crops with
        ``fold_in(key, 0)`` and flips with ``fold_in(key, 1)``.
      padding: the crop's zero padding (``client.crop_padding``).
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}; got {kind!r}")
    if padding < 0:
        raise ValueError(f"crop padding must be >= 0; got {padding}")
    if kind == "none":
        return None

    def augment(key, x):
        if "crop" in kind:
            x = random_crop(jax.random.fold_in(key, 0), x, padding)
        if "flip" in kind:
            x = random_flip(jax.random.fold_in(key, 1), x)
        return x

    return augment
