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
* The papers' models: ``cnn5-C1-C2-D`` (FedAvg's CNN), ``resnet-D[-G]``
  (CIFAR ResNet-8/20 with GroupNorm, FedDF), ``cnn1d-C1-...`` (MNIST-1D's
  CNN), ``lstm-E-H1-...`` (the Shakespeare character LSTM) and
  ``transformer-D-L-H`` (a small causal transformer); the last two take int32
  token sequences.

Inputs stored compactly are converted inside the compiled round by
:func:`prepare_inputs` (uint8 pixels to ``[0, 1]``).
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


class FedAvgCNN(nnx.Module):
    """The CNN of FedAvg (McMahan et al. 2017, arXiv 1602.05629) for (F)EMNIST and MNIST.

    Two 5x5 SAME convolutions (C1, C2 channels) with ReLU, each followed by
    2x2 max-pooling, a D-unit ReLU dense layer and the linear head, as
    ``google-research/federated:utils/models/emnist_models.py:
    create_original_fedavg_cnn_model``: ``cnn5-32-64-512`` on 28x28x1 with 10
    classes has 1,663,370 parameters (LEAF's FEMNIST CNN: ``cnn5-32-64-2048``).
    """

    def __init__(self, image_shape, c1: int, c2: int, dense: int, num_classes: int, *, rngs):
        self.image_shape = image_shape
        self.conv0 = nnx.Conv(image_shape[-1], c1, kernel_size=(5, 5), padding="SAME", rngs=rngs)
        self.conv1 = nnx.Conv(c1, c2, kernel_size=(5, 5), padding="SAME", rngs=rngs)
        h, w = image_shape[0] // 4, image_shape[1] // 4
        self.dense = nnx.Linear(h * w * c2, dense, rngs=rngs)
        self.head = nnx.Linear(dense, num_classes, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], *self.image_shape)
        for conv in (self.conv0, self.conv1):
            x = nnx.max_pool(nnx.relu(conv(x)), window_shape=(2, 2), strides=(2, 2))
        return self.head(nnx.relu(self.dense(x.reshape(x.shape[0], -1))))


class _Block(nnx.Module):
    """ResNet BasicBlock with GroupNorm: conv3x3-GN-ReLU-conv3x3-GN, plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, *, rngs):
        conv = dict(kernel_size=(3, 3), padding=((1, 1), (1, 1)), use_bias=False, rngs=rngs)
        self.conv0 = nnx.Conv(cin, cout, strides=(stride, stride), **conv)
        self.norm0 = nnx.GroupNorm(cout, num_groups=groups, rngs=rngs)
        self.conv1 = nnx.Conv(cout, cout, **conv)
        self.norm1 = nnx.GroupNorm(cout, num_groups=groups, rngs=rngs)
        self.project = stride != 1 or cin != cout
        if self.project:
            self.short = nnx.Conv(
                cin, cout, kernel_size=(1, 1), strides=(stride, stride), use_bias=False, rngs=rngs
            )
            self.short_norm = nnx.GroupNorm(cout, num_groups=groups, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.norm0(self.conv0(x)))
        h = self.norm1(self.conv1(h))
        shortcut = self.short_norm(self.short(x)) if self.project else x
        return nnx.relu(h + shortcut)


class ResNetGN(nnx.Module):
    """CIFAR ResNet of depth ``6n + 2`` with GroupNorm (FedDF's ``ResNet_cifar``).

    Lin et al., "Ensemble Distillation for Robust Model Fusion in Federated
    Learning" (FedDF, NeurIPS 2020, arXiv 2006.07242), code
    ``epfml/federated-learning-public-code:codes/FedDF-code/pcode/models/resnet.py``:
    conv3x3 16 (no bias) + norm + ReLU, three stages of ``n`` BasicBlocks at
    16/32/64 channels with strides 1/2/2, global average pooling, a linear
    head. GroupNorm replaces BatchNorm (simulated clients carry parameters
    only; Hsieh et al. 2020, arXiv 1910.00189, recommend GroupNorm under
    non-IID data), with ``groups`` groups (default 2). ``resnet-8``: n = 1,
    ``resnet-20``: n = 3.
    """

    def __init__(self, image_shape, depth: int, groups: int, num_classes: int, *, rngs):
        self.image_shape = image_shape
        n = (depth - 2) // 6
        self.stem = nnx.Conv(
            image_shape[-1],
            16,
            kernel_size=(3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            rngs=rngs,
        )
        self.stem_norm = nnx.GroupNorm(16, num_groups=groups, rngs=rngs)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(_Block(cin, cout, stride if i == 0 else 1, groups, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(64, num_classes, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], *self.image_shape)
        x = nnx.relu(self.stem_norm(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


class CNN1D(nnx.Module):
    """MNIST-1D's ConvBase (Greydanus & Kobak 2024, ``mnist1d`` notebooks/models.py).

    1-D convolutions with C1, C2, ... channels, stride 2 and padding 1, the
    first of kernel 5 and the rest of kernel 3, each with ReLU, then a linear
    head on the flattened output: ``cnn1d-25-25-25`` on 40 points is the
    reference's 5,210-parameter model.
    """

    def __init__(self, length: int, channels: Sequence[int], num_classes: int, *, rngs):
        self.length = length
        dims = [1, *channels]
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            k = 5 if i == 0 else 3
            setattr(
                self,
                f"conv{i}",
                nnx.Conv(a, b, kernel_size=(k,), strides=(2,), padding=((1, 1),), rngs=rngs),
            )
            length = (length + 2 - k) // 2 + 1
        self.num_conv = len(channels)
        self.head = nnx.Linear(length * dims[-1], num_classes, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], self.length, 1)
        for i in range(self.num_conv):
            x = nnx.relu(getattr(self, f"conv{i}")(x))
        return self.head(x.reshape(x.shape[0], -1))


class CharLSTM(nnx.Module):
    """Character LSTM for next-character prediction (McMahan et al. 2017's Shakespeare model).

    Embedding of E per token, stacked LSTM layers (H1, H2, ...), a linear head
    on the last step's output: ``lstm-8-256-256`` is the paper's model
    (``google-research/federated:utils/models/shakespeare_models.py``; LEAF's
    ``stacked_lstm.py`` likewise predicts only the character after the
    80-character window). The LSTM is written out (gates i, f, g, o; forget
    bias 0) and scanned over time; token ids index the embedding (vocabulary
    = the number of classes, as in next-token tasks). With ``per_position``
    the head runs on every step's output: logits ``[B, T, V]`` for
    per-position targets (StackOverflow's next word; TFF's Shakespeare task
    is per position too, but this project's Shakespeare loader builds LEAF's
    one-target windows).
    """

    def __init__(self, vocab: int, embed: int, widths: Sequence[int], *, per_position=False, rngs):
        self.per_position = per_position
        self.embed = nnx.Embed(vocab, embed, rngs=rngs)
        dims = [embed, *widths]
        self.widths = tuple(widths)
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            setattr(self, f"inp{i}", nnx.Linear(a, 4 * b, rngs=rngs))
            setattr(self, f"rec{i}", nnx.Linear(b, 4 * b, use_bias=False, rngs=rngs))
        self.head = nnx.Linear(dims[-1], vocab, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x.astype(jnp.int32))  # [B, T, E]
        for i, width in enumerate(self.widths):
            gates_in = getattr(self, f"inp{i}")(h)  # [B, T, 4H], all steps at once
            w_rec = getattr(self, f"rec{i}").kernel[...]

            def step(carry, g, w_rec=w_rec):
                c, hid = carry
                z = g + hid @ w_rec
                i_, f_, g_, o_ = jnp.split(z, 4, axis=-1)
                c = jax.nn.sigmoid(f_) * c + jax.nn.sigmoid(i_) * jnp.tanh(g_)
                hid = jax.nn.sigmoid(o_) * jnp.tanh(c)
                return (c, hid), hid

            zeros = jnp.zeros((x.shape[0], width), gates_in.dtype)
            _, h = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(gates_in, 0, 1))
            h = jnp.swapaxes(h, 0, 1)
        return self.head(h if self.per_position else h[:, -1])


class CausalTransformer(nnx.Module):
    """A small causal (decoder-only) transformer predicting the token after a sequence.

    Token and learned position embeddings of width D, L pre-norm blocks
    (causal multi-head self-attention with H heads, then a 4D ReLU MLP, each
    with a residual), a final LayerNorm and a linear head on the last position
    (Vaswani et al. 2017, arXiv 1706.03762; GPT-2's pre-norm layout).
    ``transformer-64-2-4``: D = 64, L = 2, H = 4. With ``per_position`` the
    head runs on every position (logits ``[B, T, V]``, each position seeing
    only itself and earlier ones).
    """

    def __init__(
        self, length, vocab, width, layers, heads, *, per_position=False, rngs
    ):  # fmt: skip
        self.per_position = per_position
        self.heads = heads
        self.tok = nnx.Embed(vocab, width, rngs=rngs)
        self.pos = nnx.Embed(length, width, rngs=rngs)
        self.num_layers = layers
        for i in range(layers):
            setattr(self, f"ln_a{i}", nnx.LayerNorm(width, rngs=rngs))
            setattr(self, f"qkv{i}", nnx.Linear(width, 3 * width, rngs=rngs))
            setattr(self, f"out{i}", nnx.Linear(width, width, rngs=rngs))
            setattr(self, f"ln_m{i}", nnx.LayerNorm(width, rngs=rngs))
            setattr(self, f"up{i}", nnx.Linear(width, 4 * width, rngs=rngs))
            setattr(self, f"down{i}", nnx.Linear(4 * width, width, rngs=rngs))
        self.ln_f = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, x):
        b, t = x.shape[0], x.shape[1]
        h = self.tok(x.astype(jnp.int32)) + self.pos(jnp.arange(t))[None]
        causal = jnp.tril(jnp.ones((t, t), bool))
        for i in range(self.num_layers):
            q, k, v = jnp.split(getattr(self, f"qkv{i}")(getattr(self, f"ln_a{i}")(h)), 3, -1)
            split = lambda a: a.reshape(b, t, self.heads, -1)  # noqa: E731
            q, k, v = split(q), split(k), split(v)
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
            scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
            att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v).reshape(b, t, -1)
            h = h + getattr(self, f"out{i}")(att)
            m = getattr(self, f"ln_m{i}")(h)
            h = h + getattr(self, f"down{i}")(nnx.relu(getattr(self, f"up{i}")(m)))
        h = self.ln_f(h)
        return self.head(h if self.per_position else h[:, -1])


def _fedavg_cnn(sizes: tuple[int, ...], feature_shape: tuple[int, ...], num_classes: int):
    if len(sizes) != 3:
        raise ValueError(f"cnn5 takes 3 sizes (C1-C2-D, e.g. cnn5-32-64-512); got {len(sizes)}")
    image_shape = _image_shape(feature_shape, "cnn5")
    if image_shape[0] % 4 or image_shape[1] % 4:
        raise ValueError(f"cnn5 needs image sides divisible by 4; got {image_shape}")
    return lambda rngs: FedAvgCNN(image_shape, *sizes, num_classes, rngs=rngs)


def _resnet(sizes: tuple[int, ...], feature_shape: tuple[int, ...], num_classes: int):
    depth, groups = sizes[0], (sizes[1] if len(sizes) > 1 else 2)
    if len(sizes) > 2 or (depth - 2) % 6 or depth < 8:
        raise ValueError(
            f"resnet takes a depth 6n+2 (8, 20, 32, ...) and optionally GroupNorm groups, "
            f"e.g. resnet-20 or resnet-8-4; got {'-'.join(map(str, sizes))}"
        )
    if groups < 1 or 16 % groups:
        raise ValueError(f"resnet GroupNorm groups must divide 16; got {groups}")
    image_shape = _image_shape(feature_shape, "resnet")
    return lambda rngs: ResNetGN(image_shape, depth, groups, num_classes, rngs=rngs)


def _cnn1d(sizes: tuple[int, ...], feature_shape: tuple[int, ...], num_classes: int):
    length = math.prod(feature_shape)
    out = length
    for i in range(len(sizes)):
        out = (out + 2 - (5 if i == 0 else 3)) // 2 + 1
    if out < 1:
        raise ValueError(f"cnn1d: {len(sizes)} stride-2 layers leave nothing of length {length}")
    return lambda rngs: CNN1D(length, sizes, num_classes, rngs=rngs)


def _lstm(sizes, feature_shape, num_classes, per_position=False):
    if len(sizes) < 2:
        raise ValueError("lstm takes an embedding width and LSTM widths, e.g. lstm-8-256-256")
    if len(feature_shape) != 1:
        raise ValueError(f"lstm takes token sequences [T]; got feature shape {feature_shape}")
    return lambda rngs: CharLSTM(
        num_classes, sizes[0], sizes[1:], per_position=per_position, rngs=rngs
    )


def _transformer(sizes, feature_shape, num_classes, per_position=False):
    if len(sizes) != 3 or sizes[0] % sizes[2]:
        raise ValueError(
            "transformer takes width D, layers L and heads H (H divides D), e.g. transformer-64-2-4"
        )
    if len(feature_shape) != 1:
        raise ValueError(
            f"transformer takes token sequences [T]; got feature shape {feature_shape}"
        )
    return lambda rngs: CausalTransformer(
        feature_shape[0], num_classes, *sizes, per_position=per_position, rngs=rngs
    )


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
        ModelSpec(
            "cnn5",
            "FedAvg's CNN (McMahan 2017): two 5x5 conv + max-pool, a dense layer",
            _fedavg_cnn,
            sizes="C1, C2 channels and D dense units",
            form="cnn5-C1-C2-D",
            example="cnn5-32-64-512",
        ),
        ModelSpec(
            "resnet",
            "CIFAR ResNet-(6n+2) with GroupNorm (FedDF): depth, optional groups (2)",
            _resnet,
            sizes="depth and groups",
            form="resnet-D[-G]",
            example="resnet-8",
        ),
        ModelSpec(
            "cnn1d",
            "MNIST-1D's 1-D CNN: stride-2 convolutions (kernel 5, then 3), linear head",
            _cnn1d,
            sizes="convolution channels",
            example="cnn1d-25-25-25",
        ),
        ModelSpec(
            "lstm",
            "character LSTM (McMahan 2017): embedding E, LSTM widths; next token",
            _lstm,
            sizes="embedding and LSTM widths",
            form="lstm-E-H1[-H2...]",
            example="lstm-8-256-256",
            inputs="tokens",
        ),
        ModelSpec(
            "transformer",
            "small causal transformer: width D, layers L, heads H; next token",
            _transformer,
            sizes="width, layers and heads",
            form="transformer-D-L-H",
            example="transformer-64-2-4",
            inputs="tokens",
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


def _image_shape(feature_shape: tuple[int, ...], family: str = "cnn") -> tuple[int, int, int]:
    if len(feature_shape) == 3:
        return tuple(feature_shape)  # type: ignore[return-value]
    if len(feature_shape) == 2:
        return (*feature_shape, 1)  # type: ignore[return-value]
    side = math.isqrt(feature_shape[0])
    if len(feature_shape) == 1 and side * side == feature_shape[0]:
        return (side, side, 1)
    raise ValueError(
        f"{family} models need image-like features (HxW, HxWxC or a square flat length); "
        f"got feature shape {feature_shape}"
    )


def create(
    name: str, *, feature_shape: Sequence[int], num_classes: int, per_position: bool = False
) -> Model:
    """Builds the model called ``name`` for inputs of ``feature_shape``.

    Args:
      name: a family of :data:`MODEL_SPECS` with its sizes: ``linear``,
        ``mlp-W1[-W2...]`` or ``cnn-C1[-C2...]``.
      feature_shape: shape of one example (without the batch axis).
      num_classes: number of output logits.
      per_position: logits for every position of a token sequence
        (``[B, T, C]``, next-token targets per position); only the token
        families (``lstm``, ``transformer``), whose ``build`` then gets
        ``per_position=True``.

    Returns:
      A :class:`Model` with pure ``init`` and ``apply``.

    Example::

      model = create("mlp-64", feature_shape=(64,), num_classes=10)
      params = model.init(jax.random.key(0))
      logits = model.apply(params, jnp.zeros((5, 64)))  # [5, 10]
    """
    spec, sizes = parse_name(name)
    feature_shape = tuple(int(d) for d in feature_shape)
    if not per_position:
        return from_nnx(spec.build(sizes, feature_shape, num_classes), name=name)
    if spec.inputs != "tokens":
        raise ValueError(
            f"{name} gives one prediction per example, and the targets are per position "
            "(next-token task): use a sequence model (lstm, transformer)"
        )
    build = spec.build(sizes, feature_shape, num_classes, per_position=True)
    return from_nnx(build, name=name)


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
