"""MNIST-1D, generated procedurally (no download).

Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D" (ICML 2024,
arXiv 2011.14439); reference generator ``mnist1d/data.py:make_dataset`` and
``mnist1d/transform.py:transform`` (PyPI ``mnist1d`` 0.0.2.post1). Ten
hand-drawn 12-point templates, one per digit, each turned into a 40-point
signal by the reference's pipeline, for every example in this order:

1. pad the template (plus ``1e-8``) with ``p = 36 + int(u * 25)`` zeros;
2. interpolate linearly to 72 points;
3. scale by ``1 + 0.4 (u - 0.5)``;
4. rotate right by ``k ~ U{0..47}``;
5. where the signal is exactly 0, put correlated noise: ``0.25 N(0, 1)^72``
   smoothed by a Gaussian filter with sigma 2 (SciPy's ``gaussian_filter``:
   reflect mode, truncated at 4 sigma);
6. add iid noise ``0.02 N(0, 1)^72``;
7. shear: subtract ``0.75 (u - 0.5) * linspace(-0.5, 0.5, 72)``;
8. interpolate linearly to 40 points.

``num_samples // 10`` examples per class are made in class order, then
shuffled by one permutation, globally standardized (mean 0, std 1), and split
``int(0.8 n)`` train / rest test (the standard 4,000 / 1,000 split for the
default 5,000). All draws come from NumPy's legacy ``RandomState(seed)`` in
the reference's order (``rand`` for the padding, ``rand`` for the scale,
``choice(48)``, ``randn(72)`` twice, ``rand`` for the shear; then
``permutation``), so a seed gives the reference's arrays; the tests compare
against the ``mnist1d`` package itself. The reference's accuracies (its
README): logistic regression 32%, MLP 68%, CNN 94%, GRU 91%.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TEMPLATES", "make_mnist1d", "templates"]

#: The reference's 12-point templates for digits 0..9 (``get_templates``), before whitening.
TEMPLATES = np.asarray(
    [
        [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
        [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
        [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
        [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
        [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
        [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
        [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
        [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
    ],
    dtype=np.float64,
)

_PADDING = (36, 60)
_SCALE_COEFF = 0.4
_MAX_TRANSLATION = 48
_CORR_NOISE = 0.25
_IID_NOISE = 2e-2
_SHEAR = 0.75
_LENGTH = 40
_EPS = 1e-8


def templates() -> np.ndarray:
    """The whitened templates ``[10, 12]``: zero mean, unit std, starting at 0, divided by 6."""
    x = TEMPLATES - TEMPLATES.mean(1, keepdims=True)
    x /= x.std(1, keepdims=True)
    x -= x[:, :1]
    return x / 6.0


def _interpolate(x: np.ndarray, n: int) -> np.ndarray:
    """Linear interpolation of ``x`` (on ``linspace(0, 1, len(x))``) at ``n`` even points."""
    return np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(x)), x)


def _transform(x: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """One template to one 40-point example (steps 1-8 of the module docstring)."""
    from scipy.ndimage import gaussian_filter1d

    low, high = _PADDING
    p = low + int(rng.rand() * (high - low + 1))
    length = len(x) + high
    new = _interpolate(np.concatenate([x + _EPS, np.zeros(p)]), length)
    new *= 1 + _SCALE_COEFF * (rng.rand() - 0.5)
    k = rng.choice(_MAX_TRANSLATION)
    new = np.concatenate([new[len(new) - k :], new[: len(new) - k]])
    mask = new != 0
    corr = gaussian_filter1d(_CORR_NOISE * rng.randn(length), 2)
    new = mask * new + (1 - mask) * corr
    new = new + _IID_NOISE * rng.randn(length)
    new = new - _SHEAR * (rng.rand() - 0.5) * np.linspace(-0.5, 0.5, length)
    return _interpolate(new, _LENGTH)


def make_mnist1d(
    num_samples: int = 5000,
    *,
    seed: int = 42,
    train_split: float = 0.8,
    shuffle_seq: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generates MNIST-1D as the reference does (see the module docstring).

    Args:
      num_samples: examples in all (``num_samples // 10`` per class); the
        reference's default 5,000 gives the standard 4,000 / 1,000 split.
      seed: the generator's seed (reference default 42).
      train_split: the training fraction (reference 0.8).
      shuffle_seq: the reference's "shuffled MNIST-1D": one fixed permutation
        of the 40 positions for every example.

    Returns:
      ``(x_train, y_train, x_test, y_test)``: float32 ``[n, 40]`` standardized
      signals and int32 labels.
    """
    if num_samples < 10:
        raise ValueError(f"num_samples must be >= 10 (one per class); got {num_samples}")
    if not 0 < train_split < 1:
        raise ValueError(f"train_split must be in (0, 1); got {train_split}")
    rng = np.random.RandomState(seed)
    base = templates()
    per_class = num_samples // len(base)
    xs = np.empty((per_class * len(base), _LENGTH))
    for label, template in enumerate(base):
        for i in range(per_class):
            xs[label * per_class + i] = _transform(template, rng)
    ys = np.repeat(np.arange(len(base)), per_class)
    order = rng.permutation(len(ys))
    xs, ys = xs[order], ys[order]
    if shuffle_seq:
        xs = xs[:, rng.permutation(_LENGTH)]
    xs = (xs - xs.mean()) / xs.std()
    split = int(len(ys) * train_split)
    x, y = xs.astype(np.float32), ys.astype(np.int32)
    return x[:split], y[:split], x[split:], y[split:]
