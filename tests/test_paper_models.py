"""The papers' models: parameter counts by hand, NumPy references, compact inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_kd import experiment, models
from fedjax_kd.configs import default as default_config
from fedjax_kd.data import from_arrays


def _conv(k, cin, cout, bias=True):
    return k * cin * cout + (cout if bias else 0)


@pytest.mark.parametrize(
    "name,shape,classes,expected",
    [
        # McMahan et al.'s CNN: 1,663,370 parameters on 28x28 with 10 classes
        # (google-research/federated emnist_models.py), here also by hand.
        ("cnn5-32-64-512", (28, 28), 10, 1_663_370),
        (
            "cnn5-32-64-512",
            (28, 28),
            62,
            _conv(25, 1, 32) + _conv(25, 32, 64) + 7 * 7 * 64 * 512 + 512 + 512 * 62 + 62,
        ),
        # MNIST-1D ConvBase: lengths 40 -> 19 -> 10 -> 5, so the head takes 25 * 5.
        (
            "cnn1d-25-25-25",
            (40,),
            10,
            _conv(5, 1, 25) + 2 * _conv(3, 25, 25) + 125 * 10 + 10,
        ),
        # ResNet-8 with GroupNorm (scale + bias per channel): stem, 3 blocks, head.
        (
            "resnet-8",
            (32, 32, 3),
            10,
            (_conv(9, 3, 16, False) + 32)
            + (2 * _conv(9, 16, 16, False) + 2 * 32)
            + (_conv(9, 16, 32, False) + _conv(9, 32, 32, False) + 2 * 64 + 16 * 32 + 64)
            + (_conv(9, 32, 64, False) + _conv(9, 64, 64, False) + 2 * 128 + 32 * 64 + 128)
            + 64 * 10
            + 10,
        ),
        # Character LSTM: embedding 81 x 8, per layer input (with bias) and recurrent kernels.
        (
            "lstm-8-256-256",
            (80,),
            81,
            81 * 8
            + (8 * 1024 + 1024 + 256 * 1024)
            + (256 * 1024 + 1024 + 256 * 1024)
            + 256 * 81
            + 81,
        ),
    ],
)
def test_param_counts_by_hand(name, shape, classes, expected):
    model = models.create(name, feature_shape=shape, num_classes=classes)
    assert models.num_params(model.init(jax.random.key(0))) == expected


def _lstm_reference(params, tokens, widths):
    """A plain NumPy LSTM, one example and one time step at a time."""
    p = jax.tree.map(np.asarray, params)
    out = []
    for seq in tokens:
        h_seq = [p["embed"]["embedding"][t] for t in seq]
        for i, width in enumerate(widths):
            c, h = np.zeros(width), np.zeros(width)
            new = []
            for x_t in h_seq:
                z = x_t @ p[f"inp{i}"]["kernel"] + p[f"inp{i}"]["bias"] + h @ p[f"rec{i}"]["kernel"]
                ig, fg, gg, og = np.split(z, 4)
                sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
                c = sig(fg) * c + sig(ig) * np.tanh(gg)
                h = sig(og) * np.tanh(c)
                new.append(h)
            h_seq = new
        out.append(h_seq[-1] @ p["head"]["kernel"] + p["head"]["bias"])
    return np.stack(out)


def test_lstm_matches_a_numpy_loop():
    model = models.create("lstm-3-5-4", feature_shape=(6,), num_classes=7)
    params = model.init(jax.random.key(3))
    tokens = np.random.default_rng(0).integers(0, 7, (4, 6)).astype(np.int32)
    got = jax.jit(model.apply)(params, tokens)
    np.testing.assert_allclose(got, _lstm_reference(params, tokens, (5, 4)), rtol=1e-5, atol=1e-6)


def _layer_norm(x, p):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _transformer_reference(params, tokens, layers, heads):
    """Causal self-attention written with explicit loops over positions j <= i."""
    p = jax.tree.map(np.asarray, params)
    out = []
    for seq in tokens:
        t = len(seq)
        h = np.stack(
            [p["tok"]["embedding"][s] + p["pos"]["embedding"][i] for i, s in enumerate(seq)]
        )
        for i in range(layers):
            qkv = _layer_norm(h, p[f"ln_a{i}"]) @ p[f"qkv{i}"]["kernel"] + p[f"qkv{i}"]["bias"]
            q, k, v = np.split(qkv, 3, -1)
            d = q.shape[-1] // heads
            att = np.zeros_like(q)
            for a in range(heads):
                cols = slice(a * d, (a + 1) * d)
                for pos in range(t):
                    s = np.array([q[pos, cols] @ k[j, cols] / np.sqrt(d) for j in range(pos + 1)])
                    w = np.exp(s - s.max())
                    w /= w.sum()
                    att[pos, cols] = sum(w[j] * v[j, cols] for j in range(pos + 1))
            h = h + att @ p[f"out{i}"]["kernel"] + p[f"out{i}"]["bias"]
            m = _layer_norm(h, p[f"ln_m{i}"])
            up = np.maximum(m @ p[f"up{i}"]["kernel"] + p[f"up{i}"]["bias"], 0)
            h = h + up @ p[f"down{i}"]["kernel"] + p[f"down{i}"]["bias"]
        last = _layer_norm(h, p["ln_f"])[-1]
        out.append(last @ p["head"]["kernel"] + p["head"]["bias"])
    return np.stack(out)


def test_transformer_matches_a_causal_numpy_loop():
    model = models.create("transformer-8-2-2", feature_shape=(5,), num_classes=7)
    params = model.init(jax.random.key(1))
    tokens = np.random.default_rng(1).integers(0, 7, (3, 5)).astype(np.int32)
    got = jax.jit(model.apply)(params, tokens)
    want = _transformer_reference(params, tokens, layers=2, heads=2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_cnn1d_matches_a_numpy_convolution():
    model = models.create("cnn1d-3-2", feature_shape=(12,), num_classes=4)
    params = jax.tree.map(np.asarray, model.init(jax.random.key(2)))
    x = np.random.default_rng(2).normal(size=(2, 12)).astype(np.float32)

    def conv(h, p, k):  # h [L, Cin]; stride 2, padding 1 on each side
        h = np.pad(h, ((1, 1), (0, 0)))
        n = (len(h) - k) // 2 + 1
        return (
            np.stack([np.einsum("kc,kco->o", h[2 * i : 2 * i + k], p["kernel"]) for i in range(n)])
            + p["bias"]
        )

    want = []
    for row in x:
        h = np.maximum(conv(row[:, None], params["conv0"], 5), 0)
        h = np.maximum(conv(h, params["conv1"], 3), 0)
        want.append(h.reshape(-1) @ params["head"]["kernel"] + params["head"]["bias"])
    np.testing.assert_allclose(
        jax.jit(model.apply)(params, x), np.stack(want), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", ["cnn5-8-8-16", "resnet-8", "cnn-4"])
def test_uint8_pixels_equal_float_pixels_over_255(name):
    model = models.create(name, feature_shape=(8, 8, 3), num_classes=5)
    params = model.init(jax.random.key(0))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)
    as_uint8 = jax.jit(model.apply)(params, jnp.asarray(pixels))
    as_float = jax.jit(model.apply)(params, jnp.asarray(pixels, jnp.float32) / 255.0)
    np.testing.assert_array_equal(as_uint8, as_float)


@pytest.mark.parametrize(
    "bad", ["resnet-9", "resnet-8-3", "resnet-8-2-1", "cnn5-32-64", "lstm-8", "transformer-10-2-4"]
)
def test_bad_paper_model_names(bad):
    with pytest.raises(ValueError):
        shape = (80,) if bad.startswith(("lstm", "transformer")) else (32, 32, 3)
        models.create(bad, feature_shape=shape, num_classes=10)


def _tiny(x_dtype):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 10, (40, 6)).astype(x_dtype)
    y = rng.integers(0, 10, 40)
    return from_arrays(x[:30], y[:30], x[30:], y[30:], num_classes=10, num_clients=3, compact=True)


@pytest.mark.parametrize(
    "dtype,student,message",
    [
        (np.float32, "lstm-4-8", "takes int32 token ids"),
        (np.int32, "mlp-8", "holds int32 token ids"),
    ],
)
def test_model_and_inputs_must_match(dtype, student, message):
    config = default_config.get_config()
    config.model.student = student
    with pytest.raises(experiment.ConfigError, match=message):
        experiment.build_algorithm(config, _tiny(dtype))


def test_start_up_line_counts_bytes_and_params_by_hand(digits_small):
    config = default_config.get_config()
    config.model.student = "mlp-16"
    config.model.teacher = "mlp-8"
    line = experiment.describe_run(config, digits_small)
    n = int(digits_small.train.count.sum())
    assert f"{n:,} train / 360 test examples of (64,) float32 (260 B each" in line
    assert f"mlp-16 ({64 * 16 + 16 + 16 * 10 + 10:,} params)" in line
    config.algorithm.name = "teacher_student"
    line = experiment.describe_run(config, digits_small)
    assert f"teacher mlp-8: {64 * 8 + 8 + 8 * 10 + 10:,} params" in line
    pixels = _tiny(np.uint8)
    assert "of (6,) uint8 (10 B each with its label)" in experiment.describe_run(config, pixels)
