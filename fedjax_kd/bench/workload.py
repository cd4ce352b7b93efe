"""The benchmark's workload: the cohort it times, its models, and their FLOPs.

The cohort is synthetic and deterministic in the seed, of one of three input
kinds (``--input``, :func:`fedjax_kd.bench.options.parse_input`):

* ``features:N``: FedProx's Synthetic-IID (the original workload, ``features:60``);
* ``image:HxWxC``: uint8 pixels labelled by a fixed random linear rule;
* ``tokens:T:V``: int32 token sequences of a fixed Markov chain, labelled by
  the token that follows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_kd import models
from fedjax_kd.bench.options import (
    DEFAULT_INPUT,
    NUM_CLASSES,
    BenchError,
    BenchInput,
    parse_input,
)
from fedjax_kd.data import ClientData

DENSE_FAMILIES = ("linear", "mlp")  # FLOPs by the exact matmul formula
TOKEN_BRANCHING = 4  # successors per token of the tokens:T:V Markov chain

# --------------------------------------------------------------------------- models


def _as_input(value: BenchInput | str) -> BenchInput:
    return value if isinstance(value, BenchInput) else parse_input(value)


@functools.lru_cache(maxsize=64)
def check_model(name: str, bench_input: BenchInput | str, *, flag: str = "model") -> None:
    """:class:`BenchError` (one line) unless the built-in model ``name`` takes ``bench_input``.

    A sequence model (``ModelSpec.inputs == "tokens"``) needs ``tokens:T:V``;
    the others need features or pixels. The model is then built and its
    forward pass traced on one example (``jax.eval_shape``, nothing computed),
    so that shapes it cannot take are refused here rather than mid-run.
    """
    bench_input = _as_input(bench_input)
    try:
        spec, _ = models.parse_name(name)
    except ValueError as e:
        raise BenchError(f"{flag}: {e}") from None
    if spec.inputs != bench_input.model_inputs:
        if spec.inputs == "tokens":
            raise BenchError(
                f"{flag}: {name} takes int32 token ids, and --input {bench_input.text} holds "
                f"{bench_input.describe()}; use --input tokens:T:V (e.g. tokens:80:81)"
            )
        takes = [s.example for s in models.MODEL_SPECS.values() if s.inputs == "tokens"]
        raise BenchError(
            f"{flag}: {name} takes features or pixels, and --input {bench_input.text} holds "
            f"int32 token ids; use a sequence model ({', '.join(takes)})"
        )
    try:
        model = _create(name, bench_input)
        params = jax.eval_shape(model.init, jax.random.key(0))
        out = jax.eval_shape(model.apply, params, _example_batch(bench_input))
    except (ValueError, TypeError) as e:
        raise BenchError(f"{flag}: {name} cannot take --input {bench_input.text}: {e}") from None
    if tuple(out.shape) != (1, bench_input.num_classes):
        raise BenchError(
            f"{flag}: {name} on --input {bench_input.text} gives outputs of shape "
            f"{tuple(out.shape)[1:]}, not {bench_input.num_classes} logits"
        )


def _create(name: str, bench_input: BenchInput) -> models.Model:
    return models.create(name, feature_shape=bench_input.shape, num_classes=bench_input.num_classes)


def create_model(name: str, bench_input: BenchInput | str) -> models.Model:
    """The built-in model ``name`` for the cohort of ``bench_input`` (checked first)."""
    bench_input = _as_input(bench_input)
    check_model(name, bench_input)
    return _create(name, bench_input)


def _example_batch(bench_input: BenchInput, batch: int = 1) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((batch, *bench_input.shape), jnp.dtype(bench_input.dtype))


# --------------------------------------------------------------------------- FLOPs


def flops_source(name: str) -> str:
    """How :func:`forward_flops` counts ``name``: ``matmul formula`` or ``xla cost analysis``."""
    family = name.split("-")[0]
    return "matmul formula" if family in DENSE_FAMILIES else "xla cost analysis"


def forward_flops(
    name: str,
    in_shape: int | tuple[int, ...],
    num_classes: int,
    *,
    dtype: str = "float32",
    flag: str = "model",
) -> int:
    """FLOPs of one example's forward pass of the built-in model ``name``.

    Dense models (``linear``, ``mlp-W1-...``): the matmuls exactly,
    ``sum_layers 2 * in * out`` with ``in = prod(in_shape)``. Every other
    model: XLA's cost analysis of the compiled forward pass on a batch of one
    example of ``in_shape`` and ``dtype`` (:func:`xla_forward_flops`), which
    also counts elementwise work (normalisation, activations).
    """
    try:
        spec, widths = models.parse_name(name)
    except ValueError as e:
        raise BenchError(f"{flag}: {e}") from None
    shape = (in_shape,) if isinstance(in_shape, int) else tuple(int(d) for d in in_shape)
    if spec.name in DENSE_FAMILIES:
        dims = [math.prod(shape), *widths, num_classes]
        return sum(2 * a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
    try:
        return xla_forward_flops(name, shape, num_classes, dtype)
    except (ValueError, TypeError) as e:
        raise BenchError(f"{flag}: {name} cannot take inputs of shape {shape}: {e}") from None


def model_flops(name: str, bench_input: BenchInput | str, *, flag: str = "model") -> int:
    """:func:`forward_flops` of ``name`` on one example of ``bench_input``."""
    bench_input = _as_input(bench_input)
    check_model(name, bench_input, flag=flag)
    return forward_flops(
        name, bench_input.shape, bench_input.num_classes, dtype=bench_input.dtype, flag=flag
    )


@functools.lru_cache(maxsize=64)
def xla_forward_flops(name: str, shape: tuple[int, ...], num_classes: int, dtype: str) -> int:
    """XLA's count of one example's forward FLOPs, with every loop iteration counted.

    ``jax.jit(apply).lower(params, x).compile().cost_analysis()["flops"]`` on
    ``x`` of shape ``[1, *shape]``. XLA's analysis counts the body of a loop
    ONCE, whatever its trip count: for a ``lax.scan`` (the LSTM's time steps)
    the ``length - 1`` other iterations of its body are added
    (:func:`_scan_flops`). A ``while_loop`` of unknown trip count stays counted
    once (no built-in model has one).
    """
    model = models.create(name, feature_shape=shape, num_classes=num_classes)
    params = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((1, *shape), jnp.dtype(dtype))
    total = _xla_flops(model.apply, params, x)
    total += _scan_flops(jax.make_jaxpr(model.apply)(params, x).jaxpr)
    return int(round(total))


def _xla_flops(fn, *args) -> float:
    """``flops`` of XLA's cost analysis of ``jax.jit(fn)`` compiled for ``args``."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _scan_flops(jaxpr) -> float:
    """The FLOPs of ``jaxpr``'s scans beyond the one iteration XLA's analysis counts.

    A scan of ``length`` L over a body of XLA count ``X`` and (recursively)
    uncounted ``C`` really costs ``L * (X + C)``, of which ``X`` is counted.
    """
    from jax.extend import core as jex_core

    extra = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            body, length = eqn.params["jaxpr"], int(eqn.params["length"])
            avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in body.in_avals]
            once = _xla_flops(jex_core.jaxpr_as_fun(body), *avals)
            extra += (length - 1) * once + length * _scan_flops(body.jaxpr)
        else:
            for sub in jex_core.jaxprs_in_params(eqn.params):
                extra += _scan_flops(sub)
    return extra


# --------------------------------------------------------------------------- data


def make_cohort(
    num_clients: int,
    examples_per_client: int,
    seed: int = 0,
    bench_input: BenchInput | str = DEFAULT_INPUT,
):
    """K clients of exactly ``n`` synthetic examples each (NumPy ``ClientData``).

    ``bench_input`` (``--input``) chooses the examples, all deterministic in ``seed``:

    * ``features:N`` (default ``features:60``): FedProx's Synthetic-IID,
      ``x ~ N(0, diag(j^-1.2))``, ``y = argmax(x W + b)`` with one global
      ``W [N, 10], b [10] ~ N(0, 1)``; float32 ``x [K, n, N]``.
    * ``image:HxWxC``: uniformly random uint8 pixels ``x [K, n, H, W, C]``,
      ``y = argmax((x / 255 - 1/2) W + b)`` over the flattened pixels with one
      global ``W [H*W*C, 10], b [10] ~ N(0, 1)``.
    * ``tokens:T:V``: int32 ``x [K, n, T]``, windows of a fixed random Markov
      chain on ``V`` tokens (each token has 4 random successors with
      Dirichlet(1) probabilities; the first token is uniform); ``y`` is the
      token that follows the window, drawn from the same chain.
    """
    bench_input = _as_input(bench_input)
    make = {"features": _features, "image": _images, "tokens": _tokens}[bench_input.kind]
    x, y = make(num_clients * examples_per_client, bench_input.shape, bench_input, seed)
    return ClientData(
        x=x.reshape(num_clients, examples_per_client, *bench_input.shape),
        y=y.reshape(num_clients, examples_per_client),
        count=np.full((num_clients,), examples_per_client, np.int32),
    )


def _features(total: int, shape, bench_input, seed: int):
    (num_features,) = shape
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 1.0, (num_features, NUM_CLASSES))
    b = rng.normal(0.0, 1.0, NUM_CLASSES)
    x = rng.standard_normal((total, num_features), dtype=np.float32)
    x *= np.sqrt(np.arange(1, num_features + 1, dtype=np.float64) ** -1.2).astype(np.float32)
    y = np.empty(total, np.int32)
    for start in range(0, total, 1 << 16):  # float64 logits in bounded chunks
        rows = slice(start, start + (1 << 16))
        y[rows] = np.argmax(x[rows].astype(np.float64) @ w + b, axis=1)
    return x, y


def _images(total: int, shape, bench_input, seed: int):
    size = math.prod(shape)
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 1.0, (size, NUM_CLASSES))
    b = rng.normal(0.0, 1.0, NUM_CLASSES)
    x = rng.integers(0, 256, (total, *shape), dtype=np.uint8)
    flat = x.reshape(total, size)
    y = np.empty(total, np.int32)
    step = max(1, (1 << 24) // size)  # float64 pixels in bounded chunks (<= 128 MB)
    for start in range(0, total, step):
        pixels = flat[start : start + step].astype(np.float64) / 255.0 - 0.5
        y[start : start + step] = np.argmax(pixels @ w + b, axis=1)
    return x, y


def _tokens(total: int, shape, bench_input, seed: int):
    (length,) = shape
    vocab = bench_input.num_classes
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab, (vocab, TOKEN_BRANCHING))
    cdf = np.cumsum(rng.dirichlet(np.ones(TOKEN_BRANCHING), size=vocab), axis=1)
    cdf[:, -1] = 1.0
    seq = np.empty((total, length + 1), np.int32)
    seq[:, 0] = rng.integers(0, vocab, total)
    for t in range(length):  # the window's next tokens, then the label
        current = seq[:, t]
        choice = (rng.random(total)[:, None] >= cdf[current]).sum(axis=1)
        seq[:, t + 1] = successors[current, np.minimum(choice, TOKEN_BRANCHING - 1)]
    return seq[:, :length], seq[:, length]
