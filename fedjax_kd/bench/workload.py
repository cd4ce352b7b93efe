"""The benchmark's workload: the cohort it times, and the FLOPs of its models."""

from __future__ import annotations

import numpy as np

from fedjax_kd import models
from fedjax_kd.bench.options import (
    NUM_CLASSES,
    NUM_FEATURES,
    BenchError,
)
from fedjax_kd.data import ClientData

# --------------------------------------------------------------------------- FLOPs


def forward_flops(name: str, in_features: int, num_classes: int, *, flag: str = "model") -> int:
    """Matmul FLOPs of one example's forward pass: ``sum_layers 2 * in * out``.

    Only dense models (``linear``, ``mlp-W1-...``) are supported by the benchmark.
    """
    try:
        spec, widths = models.parse_name(name)
    except ValueError as e:
        raise BenchError(f"{flag}: {e}") from None
    if spec.name not in ("linear", "mlp"):
        raise BenchError(f"{flag}: the benchmark supports linear and mlp-... models, got {name!r}")
    dims = [in_features, *widths, num_classes]
    return sum(2 * a * b for a, b in zip(dims[:-1], dims[1:], strict=True))


# --------------------------------------------------------------------------- data


def make_cohort(num_clients: int, examples_per_client: int, seed: int = 0):
    """K clients of exactly ``n`` Synthetic-IID examples each (NumPy ``ClientData``).

    ``x ~ N(0, diag(j^-1.2))`` (60 features), ``y = argmax(x W + b)`` with one
    global ``W [60, 10], b [10] ~ N(0, 1)`` (FedProx's Synthetic-IID model).
    """
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 1.0, (NUM_FEATURES, NUM_CLASSES))
    b = rng.normal(0.0, 1.0, NUM_CLASSES)
    total = num_clients * examples_per_client
    x = rng.standard_normal((total, NUM_FEATURES), dtype=np.float32)
    x *= np.sqrt(np.arange(1, NUM_FEATURES + 1, dtype=np.float64) ** -1.2).astype(np.float32)
    y = np.empty(total, np.int32)
    for start in range(0, total, 1 << 16):  # float64 logits in bounded chunks
        rows = slice(start, start + (1 << 16))
        y[rows] = np.argmax(x[rows].astype(np.float64) @ w + b, axis=1)
    return ClientData(
        x=x.reshape(num_clients, examples_per_client, NUM_FEATURES),
        y=y.reshape(num_clients, examples_per_client),
        count=np.full((num_clients,), examples_per_client, np.int32),
    )
