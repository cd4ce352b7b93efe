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

from fedjax_kd.spec import ModelSpec
from fedjax_kd.types import ApplyFn, Params


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


def _mlp(sizes: tuple[int, ...], feature_shape: tuple[int, ...], num_classes: int):
    in_features = math.prod(feature_shape)
    return lambda rngs: MLP(in_features, sizes, num_classes, rngs=rngs)


def _cnn(sizes: tuple[int, ...], feature_shape: tuple[int, ...], num_classes: int):
    image_shape = _image_shape(feature_shape)
    return lambda rngs: CNN(image_shape, sizes, num_classes, rngs=rngs)


#: The built-in model families, by name: each describes itself (``fedjax-kd
#: list``) and builds its NNX module from the sizes in a model name.
MODEL_SPECS = {
    spec.name: spec
    for spec in (
        ModelSpec("linear", "multinomial logistic regression", _mlp, example="linear"),
        ModelSpec(
            "mlp", "ReLU MLP on flattened inputs", _mlp, sizes="hidden widths", example="mlp-64"
        ),
        ModelSpec(
            "cnn",
            "3x3 ReLU convolutions, 2x2 average pooling, linear head",
            _cnn,
            sizes="convolution channels",
            example="cnn-16-32",
        ),
    )
}


def parse_name(name: str) -> tuple[ModelSpec, tuple[int, ...]]:
    """Splits ``mlp-64-32`` into ``(MODEL_SPECS["mlp"], (64, 32))``; ValueError if invalid."""
    family, *widths = name.split("-")
    spec = MODEL_SPECS.get(family)
    if spec is None:
        known = ", ".join(s.pattern for s in MODEL_SPECS.values())
        raise ValueError(f"unknown model {name!r}; expected one of: {known}")
    try:
        sizes = tuple(int(w) for w in widths)
    except ValueError:
        sizes = ()
    if bool(widths) != bool(spec.sizes) or (widths and not sizes) or min(sizes, default=1) < 1:
        examples = ", ".join(s.example for s in MODEL_SPECS.values())
        raise ValueError(
            f"bad model name {name!r}; {spec.pattern}"
            + (f" with {spec.sizes} as positive integers" if spec.sizes else " takes no sizes")
            + f", e.g. {examples}"
        )
    return spec, sizes


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
      name: a family of :data:`MODEL_SPECS` with its sizes: ``linear``,
        ``mlp-W1[-W2...]`` or ``cnn-C1[-C2...]``.
      feature_shape: shape of one example (without the batch axis).
      num_classes: number of output logits.

    Returns:
      A :class:`Model` with pure ``init`` and ``apply``.

    Example::

      model = create("mlp-64", feature_shape=(64,), num_classes=10)
      params = model.init(jax.random.key(0))
      logits = model.apply(params, jnp.zeros((5, 64)))  # [5, 10]
    """
    spec, sizes = parse_name(name)
    feature_shape = tuple(int(d) for d in feature_shape)
    return from_nnx(spec.build(sizes, feature_shape, num_classes), name=name)


def prepare_inputs(x: jax.Array) -> jax.Array:
    """Compactly stored inputs as a model takes them, inside the compiled round.

    uint8 pixels become float32 in ``[0, 1]`` (``x / 255``); float32
    features and int32 token ids pass unchanged. Every built-in and wrapped
    model (:func:`from_nnx`, :func:`from_linen`) calls it first, so client
    data can stay uint8 on the host and on the device.
    """
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 255.0
    return x


def from_nnx(build: Callable[[nnx.Rngs], nnx.Module], *, name: str = "nnx") -> Model:
    """A user's Flax NNX module as a :class:`Model` (pure ``init``/``apply``).

    Args:
      build: ``build(rngs) -> module``, e.g. ``lambda rngs: MyNet(64, 10, rngs=rngs)``;
        the module's ``__call__(x)`` maps a batch ``[B, *feature_shape]`` to
        logits ``[B, num_classes]``. Its state must be ``nnx.Param`` only (no
        batch statistics: simulated clients carry parameters alone).
      name: a label for reports.

    Returns:
      A :class:`Model`: ``init(key)`` builds the module with ``nnx.Rngs(params=key)``
      and returns its parameters as a plain nested dict; ``apply`` merges them
      back (``nnx.split``/``nnx.merge``, Flax's recommended bridge).

    Example::

      class Net(nnx.Module):
          def __init__(self, rngs):
              self.dense = nnx.Linear(64, 10, rngs=rngs)

          def __call__(self, x):
              return self.dense(x)

      model = from_nnx(lambda rngs: Net(rngs), name="net")
    """
    abstract = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    _, _, other = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(other):
        raise ValueError(f"model {name!r}: NNX state other than nnx.Param is not supported")
    graphdef, _ = nnx.split(abstract)

    def init(key: jax.Array) -> Params:
        module = build(nnx.Rngs(params=key))
        return nnx.to_pure_dict(nnx.state(module, nnx.Param))

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params)(prepare_inputs(x))

    return Model(name=name, init=init, apply=apply)


def from_linen(module, feature_shape: Sequence[int], *, name: str = "linen") -> Model:
    """A user's Flax Linen module as a :class:`Model` (pure ``init``/``apply``).

    Args:
      module: a ``flax.linen.Module`` whose ``__call__(x)`` maps a batch
        ``[B, *feature_shape]`` to logits; its variables must be ``params``
        only (no ``batch_stats``).
      feature_shape: shape of one example, to initialise the module.
      name: a label for reports.

    Returns:
      A :class:`Model` with ``init(key) = module.init(key, x0)["params"]`` and
      ``apply(params, x) = module.apply({"params": params}, x)``.
    """
    dummy = jnp.zeros((1, *tuple(int(d) for d in feature_shape)), jnp.float32)
    collections = jax.eval_shape(module.init, jax.random.key(0), dummy)
    extra = sorted(set(collections) - {"params"})
    if extra:
        raise ValueError(f"model {name!r}: Linen collections {extra} are not supported")

    def init(key: jax.Array) -> Params:
        return module.init(key, dummy)["params"]

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return module.apply({"params": params}, prepare_inputs(x))

    return Model(name=name, init=init, apply=apply)


def is_import_path(name: str) -> bool:
    """Whether a model name is a user's ``package.module:function``."""
    return ":" in name


def resolve_import_path(path: str):
    """The object ``package.module:attribute`` names (``importlib``).

    Raises:
      ValueError: the module cannot be imported or has no such attribute.
    """
    import importlib

    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"expected 'package.module:function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {module_name!r} ({e}); is it on PYTHONPATH?") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attribute!r}") from None


def from_import_path(path: str, *, feature_shape: Sequence[int], num_classes: int) -> Model:
    """Builds a user's model named by ``package.module:function`` (the CLI's hook).

    ``function(feature_shape=..., num_classes=..., rngs=...)`` -- when it takes
    ``rngs`` -- returns an NNX module (:func:`from_nnx`); otherwise
    ``function(feature_shape=..., num_classes=...)`` returns a :class:`Model`
    or a Linen module (:func:`from_linen`).

    Raises:
      ValueError: the path does not resolve, or the function returns something else.
    """
    import inspect

    fn = resolve_import_path(path)
    if not callable(fn):
        raise ValueError(f"{path!r} is not a function")
    feature_shape = tuple(int(d) for d in feature_shape)
    kwargs = dict(feature_shape=feature_shape, num_classes=num_classes)
    try:
        takes_rngs = "rngs" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_rngs = False  # (a **kwargs function is called without rngs: Linen or a Model)
    if takes_rngs:
        return from_nnx(lambda rngs: fn(**kwargs, rngs=rngs), name=path)
    made = fn(**kwargs)
    if isinstance(made, Model):
        return made._replace(name=path)
    import flax.linen as linen

    if isinstance(made, linen.Module):
        return from_linen(made, feature_shape, name=path)
    raise ValueError(
        f"{path!r} returned {type(made).__name__}; expected a fedjax_kd Model, a Linen "
        "module, or (with an rngs argument) an NNX module"
    )


def num_params(params: Params) -> int:
    """Total number of scalars in a parameter tree."""
    return sum(int(jnp.size(leaf)) for leaf in jax.tree.leaves(params))
