"""Unbiased stochastic quantization of the uplink (fedjax_kd.compress.quantize_tree)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import one_error_line

from fedjax_kd import cli, compress


def test_quantization_is_unbiased():
    """The mean of M = 4000 quantizations is x up to sampling noise.

    Each coordinate's rounding error is bounded by the step s and has std at
    most s / 2, so its mean over M draws has std at most s / (2 sqrt(M)); a
    deviation beyond 5 such stds has probability below 6e-7 per coordinate
    (normal approximation), below 4e-5 over the 64 coordinates: the
    false-alarm rate of this test.
    """
    x = jnp.asarray(np.random.default_rng(0).normal(size=64).astype(np.float32))
    bits, m = 2, 4000
    draws = jax.vmap(lambda k: compress.stochastic_quantize(x, k, bits)[0])(
        jax.random.split(jax.random.key(1), m)
    )
    step = float((x.max() - x.min()) / (2**bits - 1))
    err = np.abs(np.asarray(draws).mean(0) - np.asarray(x))
    assert err.max() < 5 * step / (2 * math.sqrt(m))
    # And it is not the identity: single draws do move the values.
    assert float(jnp.abs(draws[0] - x).max()) > step / 10


def test_values_on_the_grid_and_bytes_by_hand():
    x = jnp.asarray(np.linspace(-1.0, 2.0, 12, dtype=np.float32).reshape(3, 4))
    q, nbytes = compress.stochastic_quantize(x, jax.random.key(0), 3)
    step = 3.0 / 7
    levels = (np.asarray(q) + 1.0) / step
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)  # lo + integer x step
    assert np.all(np.round(levels) >= 0) and np.all(np.round(levels) <= 7)
    # Each value lies on one of its two neighbouring levels.
    assert np.all(np.abs(np.asarray(q) - np.asarray(x)) <= step + 1e-6)
    assert nbytes == math.ceil(3 * 12 / 8) + 8  # 5 bytes of codes + min and step
    tree = {"a": jnp.zeros(10), "b": x}
    _, total = compress.quantize_tree(tree, jax.random.key(0), 3)
    assert int(total) == (math.ceil(30 / 8) + 8) + (math.ceil(36 / 8) + 8)
    const = jnp.full((5,), 0.25)
    np.testing.assert_array_equal(
        compress.stochastic_quantize(const, jax.random.key(0), 1)[0], const
    )


TINY = ["--config.rounds=3", "--config.eval_every=3", "--no-progress"]


def _summary(tmp_path, *extra):
    assert cli.main(["run", *TINY, "--workdir", str(tmp_path), *extra]) == 0
    return json.loads((tmp_path / "summary.json").read_text())


def test_uplink_bytes_are_the_encoding_and_zero_bits_is_todays_run(tmp_path):
    dense = _summary(tmp_path / "dense")
    off = _summary(tmp_path / "off", "--config.client.quantize_bits=0")
    assert dense == {**off, "wall_s": dense["wall_s"], "compile_s": dense["compile_s"]}
    q = _summary(tmp_path / "q4", "--config.client.quantize_bits=4")
    # mlp-64 on digits: kernels [64, 64] and [64, 10], biases [64] and [10].
    sizes = [64 * 64, 64, 64 * 10, 10]
    per_client = sum(math.ceil(4 * n / 8) + 8 for n in sizes) + 4  # + the float32 weight
    assert q["uplink_bytes"] == 3 * 10 * per_client
    assert q["downlink_bytes"] == dense["downlink_bytes"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--config.client.quantize_bits=17"], "config key 'client.quantize_bits'"),
        (
            ["--config.client.quantize_bits=4", "--config.algorithm.name=fedkd"],
            "algorithm 'fedkd' sends no dense update",
        ),
        (["--config.client.quantize_bits=4", "--config.dp.clip_norm=1"], "does not survive"),
    ],
)
def test_mistakes_are_one_error_line(capsys, no_run, extra, message):
    assert cli.main(["run", *TINY, *extra]) == 2
    assert message in one_error_line(capsys.readouterr().err)
