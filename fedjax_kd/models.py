"""Flax teacher/student models, chosen by name, bridged to pure functions.

Modules are written with Flax NNX and turned into two pure functions with
``nnx.split``/``nnx.merge``: ``init(key) -> params`` (a plain nested dict of
arrays) and ``apply(params, x) -> logits``. Nothing outside this file touches
Flax, so teacher and student are just two ``(init, apply)`` pairs.

Model names (widths are part of the name, so one string configures a model):

* ``linear`` -- multinomial logistic regression.
* ``mlp-W1-W2-...`` -- ReLU MLP with hidden widths W1, W2, ... (e.g.
  ``mlp-64``, ``mlp-256-256``).
* ``cnn-C1-C2-...`` -- 3x3 ReLU convolutions with C1, C2, ... channels, 2x2
  average pooling, then a linear head (e.g. ``cnn-16-32``). Flat features of a
  square length (digits: 64 = 8x8) are reshaped to a one-channel image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_kd.types import ApplyFn, Params

MODEL_FAMILIES = ("linear", "mlp", "cnn")


class Model(NamedTuple):
    """A model as two pure functions.

    Attributes:
      name: the registry name, e.g. ``mlp-64``.
      init: ``init(key) -> params`` (nested dict of float32 arrays).
      apply: ``apply(params, x) -> logits`` for a batch ``x`` of
        ``[B, *feature_shape]``.
    """

    name: str
    init: Callable[[jax.Array], Params]
    apply: ApplyFn


class MLP(nnx.Module):
    """ReLU multilayer perceptron on flattened inputs (no hidden layer = linear)."""

    def __init__(self, in_features: int, widths: Sequence[int], num_classes: int, *, rngs):
        dims = [in_features, *widths]
        self.num_hidden = len(widths)
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            setattr(self, f"dense{i}", nnx.Linear(a, b, rngs=rngs))
        self.head = nnx.Linear(dims[-1], num_classes, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for i in range(self.num_hidden):
            x = nnx.relu(getattr(self, f"dense{i}")(x))
        return self.head(x)


class CNN(nnx.Module):
    """Small convnet: 3x3 ReLU convolutions, 2x2 average pooling, linear head."""

    def __init__(
        self, image_shape: tuple[int, int, int], channels: Sequence[int], num_classes, *, rngs
    ):
        self.image_shape = image_shape
        self.num_conv = len(channels)
        dims = [image_shape[-1], *channels]
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            setattr(self, f"conv{i}", nnx.Conv(a, b, kernel_size=(3, 3), rngs=rngs))
        h, w = image_shape[0] // 2, image_shape[1] // 2
        self.head = nnx.Linear(h * w * dims[-1], num_classes, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], *self.image_shape)
        for i in range(self.num_conv):
            x = nnx.relu(getattr(self, f"conv{i}")(x))
        x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        return self.head(x.reshape(x.shape[0], -1))


def parse_name(name: str) -> tuple[str, tuple[int, ...]]:
    """Splits ``mlp-64-32`` into ``("mlp", (64, 32))``; raises ValueError if invalid."""
    family, *widths = name.split("-")
    if family not in MODEL_FAMILIES:
        raise ValueError(
            f"unknown model {name!r}; expected one of: linear, mlp-W1[-W2...], cnn-C1[-C2...]"
        )
    try:
        sizes = tuple(int(w) for w in widths)
    except ValueError:
        sizes = ()
    if (
        (family == "linear" and widths)
        or (family != "linear" and not sizes)
        or min(sizes, default=1) < 1
    ):
        raise ValueError(
            f"bad model name {name!r}; widths are positive integers joined by '-', "
            "e.g. mlp-64, mlp-256-128, cnn-16-32, linear"
        )
    return family, sizes


def _image_shape(feature_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(feature_shape) == 3:
        return tuple(feature_shape)  # type: ignore[return-value]
    if len(feature_shape) == 2:
        return (*feature_shape, 1)  # type: ignore[return-value]
    side = math.isqrt(feature_shape[0])
    if len(feature_shape) == 1 and side * side == feature_shape[0]:
        return (side, side, 1)
    raise ValueError(
        f"cnn models need image-like features (HxW, HxWxC or a square flat length); "
        f"got feature shape {feature_shape}"
    )


def create(name: str, *, feature_shape: Sequence[int], num_classes: int) -> Model:
    """Builds the model called ``name`` for inputs of ``feature_shape``.

    Args:
      name: ``linear``, ``mlp-W1[-W2...]`` or ``cnn-C1[-C2...]``.
      feature_shape: shape of one example (without the batch axis).
      num_classes: number of output logits.

    Returns:
      A :class:`Model` with pure ``init`` and ``apply``.

    Example::

      model = create("mlp-64", feature_shape=(64,), num_classes=10)
      params = model.init(jax.random.key(0))
      logits = model.apply(params, jnp.zeros((5, 64)))  # [5, 10]
    """
    family, sizes = parse_name(name)
    feature_shape = tuple(int(d) for d in feature_shape)
    if family == "cnn":
        image_shape = _image_shape(feature_shape)

        def build(rngs):
            return CNN(image_shape, sizes, num_classes, rngs=rngs)

    else:
        in_features = math.prod(feature_shape)

        def build(rngs):
            return MLP(in_features, sizes, num_classes, rngs=rngs)

    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))

    def init(key: jax.Array) -> Params:
        module = build(nnx.Rngs(params=key))
        return nnx.to_pure_dict(nnx.state(module, nnx.Param))

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params)(x)

    return Model(name=name, init=init, apply=apply)


def num_params(params: Params) -> int:
    """Total number of scalars in a parameter tree."""
    return sum(int(jnp.size(leaf)) for leaf in jax.tree.leaves(params))
