"""Per-position next-token targets: labels ``[N, T]`` with -1 where a position has none.

Oracles: hand-computed masks and losses; the per-position formulation against
the same data flattened into single-token examples; NumPy recounts of the
evaluation; bit-identity where padding (positions without a target, padded
examples) must change nothing.
"""

import dataclasses
import json
import math
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import one_error_line

from fedjax_kd import algorithms, cli, client, data, losses, models, simulate
from fedjax_kd.algorithms.fed_ntd import ntd_distill_fn

V, T = 8, 5  # vocabulary (= classes) and sequence length
IGNORE = (V - 1,)  # the "end of sentence" id accuracy does not count


def sequences(n, rng, *, min_length=1):
    """Token sequences and their next-token targets: ``y = (3x + 1) % V``, -1 past the length."""
    x = rng.integers(1, V, size=(n, T)).astype(np.int32)
    y = ((3 * x + 1) % V).astype(np.int32)
    lengths = rng.integers(min_length, T + 1, size=n)
    pad = np.arange(T)[None] >= lengths[:, None]
    x[pad] = 0
    y[pad] = losses.NO_TARGET
    return x, y, lengths


def lstm(per_position=True, name="lstm-4-8"):
    return models.create(name, feature_shape=(T,), num_classes=V, per_position=per_position)


# -- 1. losses and masks --------------------------------------------------------------


def test_target_mask_and_masked_mean_by_hand():
    labels = jnp.array([[0, 2, -1], [1, -1, -1]])
    got = losses.target_mask(labels, jnp.array([True, False]))
    np.testing.assert_array_equal(got, [[True, True, False], [False, False, False]])
    got = losses.target_mask(labels, jnp.array([True, True]))
    np.testing.assert_array_equal(got, [[True, True, False], [True, False, False]])
    # [B] labels: the mask is valid itself.
    np.testing.assert_array_equal(
        losses.target_mask(jnp.array([3, 0]), jnp.array([False, True])), [False, True]
    )
    values = jnp.array([[1.0, 2.0, 6.0], [4.0, 5.0, jnp.nan]])
    # [B, T] mask of real targets: (1 + 2 + 4) / 3.
    mask = losses.target_mask(labels, jnp.array([True, True]))
    assert float(losses.masked_mean(values, mask)) == pytest.approx(7 / 3)
    assert float(losses.masked_sum(values, mask)) == pytest.approx(7.0)
    # A [B] mask broadcasts over the positions (a public set without targets).
    assert float(losses.masked_mean(values, jnp.array([True, False]))) == pytest.approx(3.0)
    assert float(losses.masked_sum(values, jnp.array([True, False]))) == pytest.approx(9.0)


def test_per_position_losses_by_hand():
    # Two classes, equal logits: CE = log 2; [0, log 3] with label 1: -log(3/4).
    logits = jnp.array([[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 1.0]]])
    labels = jnp.array([[0, 1, -1]])
    ce = np.asarray(losses.cross_entropy(logits, labels))
    assert ce.shape == (1, 3)
    np.testing.assert_allclose(ce[0, :2], [math.log(2.0), -math.log(0.75)], rtol=1e-6)
    assert np.isfinite(ce[0, 2])  # a finite value that target_mask masks away
    np.testing.assert_array_equal(losses.accuracy(logits, labels), [[1.0, 1.0, 0.0]])
    dropped = losses.not_true_logits(jnp.arange(6.0).reshape(1, 2, 3), jnp.array([[1, 2]]))
    np.testing.assert_array_equal(dropped, [[[0.0, 2.0], [3.0, 4.0]]])


def test_per_position_losses_equal_the_flattened_ones():
    rng = np.random.default_rng(0)
    b, t, c = 3, 4, 5
    logits = jnp.asarray(rng.normal(size=(b, t, c)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, c, size=(b, t)), jnp.int32)
    teacher = jnp.asarray(rng.normal(size=(b, t, c)), jnp.float32)
    flat_l, flat_y, flat_t = logits.reshape(-1, c), labels.reshape(-1), teacher.reshape(-1, c)
    pairs = [
        (losses.cross_entropy(logits, labels), losses.cross_entropy(flat_l, flat_y)),
        (losses.accuracy(logits, labels), losses.accuracy(flat_l, flat_y)),
        (losses.not_true_logits(logits, labels), losses.not_true_logits(flat_l, flat_y)),
        (
            losses.distillation_loss(logits, teacher, 2.0),
            losses.distillation_loss(flat_l, flat_t, 2.0),
        ),
        (
            losses.not_true_distillation_loss(logits, teacher, labels),
            losses.not_true_distillation_loss(flat_l, flat_t, flat_y),
        ),
    ]
    for per_position, flat in pairs:
        per_position, flat = np.asarray(per_position), np.asarray(flat)
        assert per_position.shape[:2] == (b, t)
        np.testing.assert_allclose(per_position.reshape(flat.shape), flat, rtol=1e-6, atol=1e-7)


def test_sum_batches_counts_real_targets():
    x, y, _ = sequences(7, np.random.default_rng(1))
    count = 5  # rows 5, 6 are padding, whatever their labels say

    def fn(block, ok):
        assert ok.shape == block["y"].shape  # the [b, T] mask of real targets
        return jnp.sum(ok, dtype=jnp.int32)

    got = client.sum_batches(fn, {"x": x, "y": y}, jnp.int32(count), batch_size=3)
    assert int(got) == int(np.sum(y[:count] >= 0))
    assert int(got) < int(np.sum(y >= 0))  # the padded rows had targets: they were left out


# -- 2. per-position training == the flattened single-token examples ---------------------


class PositionWise(nnx.Module):
    """Each position's logits depend on its own token only: ``[B, T] -> [B, T, V]``."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(V, 6, rngs=rngs)
        self.head = nnx.Linear(6, V, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.embed(x)))


def test_client_update_equals_the_flattened_tokens():
    model = models.from_nnx(lambda rngs: PositionWise(rngs), name="positionwise")
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(2)
    x, y, _ = sequences(6, rng)
    count = 5  # row 5 is a padded row with garbage labels
    x[5], y[5] = rng.integers(0, V, T), rng.integers(0, V, T)
    real = y[:count] >= 0
    flat_x, flat_y = x[:count][real][:, None], y[:count][real]
    kwargs = dict(epochs=2, batch_size=64, prox_mu=0.1)  # full batch: one step per epoch
    per_position = client.make_client_update(model.apply, optax.sgd(0.5), **kwargs)
    flat = client.make_client_update(lambda p, t: model.apply(p, t)[:, 0], optax.sgd(0.5), **kwargs)
    key = jax.random.key(3)
    a = jax.jit(per_position)(params, x, y, jnp.int32(count), key)
    b = jax.jit(flat)(params, flat_x, flat_y, jnp.int32(len(flat_y)), key)
    chex.assert_trees_all_close(a.delta, b.delta, rtol=1e-5, atol=1e-7)
    assert any(float(jnp.max(jnp.abs(d))) > 1e-3 for d in jax.tree.leaves(a.delta))
    assert float(a.metrics["train_loss"]) == pytest.approx(float(b.metrics["train_loss"]), 1e-6)
    # The weight counts examples (sequences), as documented: count.
    assert float(a.weight) == count and int(a.metrics["local_steps"]) == 2


# -- 3. positions without a target and padded examples change nothing --------------------


@pytest.fixture(scope="module")
def lstm_client():
    """A per-position lstm-4-8, its params, and a jitted client update (batch 4, 2 epochs)."""
    model = lstm()
    update = client.make_client_update(model.apply, optax.sgd(0.5), epochs=2, batch_size=4)
    return model, model.init(jax.random.key(0)), jax.jit(update)


def test_inputs_after_the_last_target_and_padded_rows_change_nothing(lstm_client):
    _, params, update = lstm_client
    rng = np.random.default_rng(4)
    x, y, lengths = sequences(10, rng)
    assert lengths[:7].min() < T  # some rows of the real examples have trailing pads
    count = jnp.int32(7)
    key = jax.random.key(5)
    base = update(params, x, y, count, key)
    # An LSTM's output at t depends on x[:t + 1]: inputs past a row's last target are unseen.
    x2 = x.copy()
    trailing = np.arange(T)[None] >= lengths[:, None]
    x2[trailing] = rng.integers(0, V, int(trailing.sum()))
    # Padded rows (>= count) with random tokens and labels are not examples.
    y2 = y.copy()
    x2[7:] = rng.integers(0, V, (3, T))
    y2[7:] = rng.integers(0, V, (3, T))
    chex.assert_trees_all_equal(update(params, x2, y2, count, key), base)
    # Control: a changed input before a real target changes the update.
    x3 = x.copy()
    x3[0, 0] = 1 + x3[0, 0] % (V - 1)
    moved = update(params, x3, y, count, key)
    assert not np.array_equal(
        np.asarray(moved.delta["head"]["kernel"]), np.asarray(base.delta["head"]["kernel"])
    )


def test_more_padded_rows_are_bit_identical(lstm_client):
    _, params, update = lstm_client
    x, y, _ = sequences(10, np.random.default_rng(6))
    x[7:], y[7:] = 0, 0  # what pack writes into padded rows
    count, key = jnp.int32(7), jax.random.key(7)
    extra = 20
    more_x, more_y = np.pad(x, ((0, extra), (0, 0))), np.pad(y, ((0, extra), (0, 0)))
    chex.assert_trees_all_equal(
        update(params, x, y, count, key), update(params, more_x, more_y, count, key)
    )


# -- 7. distillation terms ignore positions without a target -----------------------------


@pytest.mark.parametrize("distill", ["kl", "not_true"])
def test_teacher_logits_at_pad_positions_change_nothing(lstm_client, distill):
    model, params, _ = lstm_client
    distill_fn = ntd_distill_fn(1.0) if distill == "not_true" else None
    update = jax.jit(
        client.make_client_update(
            model.apply, optax.sgd(0.5), epochs=1, batch_size=4, kd_weight=1.0,
            temperature=2.0, distill_fn=distill_fn,
        )
    )  # fmt: skip
    rng = np.random.default_rng(8)
    x, y, _ = sequences(9, rng)
    count, key = jnp.int32(7), jax.random.key(9)
    targets = rng.normal(size=(9, T, V)).astype(np.float32)
    base = update(params, x, y, count, key, targets)
    no_target = y < 0
    no_target[7:] = True  # padded rows: every position
    assert no_target[:7].any()
    changed = targets.copy()
    changed[no_target] = rng.normal(size=(int(no_target.sum()), V)) * 10
    chex.assert_trees_all_equal(update(params, x, y, count, key, changed), base)
    # Control: the teacher's logits at one real target do move the update.
    control = targets.copy()
    i, t = np.argwhere(~no_target)[0]
    control[i, t] = rng.normal(size=V) * 10
    moved = update(params, x, y, count, key, control)
    assert not np.array_equal(
        np.asarray(moved.delta["head"]["kernel"]), np.asarray(base.delta["head"]["kernel"])
    )


# -- 4. evaluation against a NumPy recount ----------------------------------------------


@pytest.fixture(scope="module")
def eval_dataset():
    """Per-position data over 6 clients; 37 test sequences of 5 test clients.

    Test client 4 holds only targets in IGNORE (and -1): its loss counts, its
    accuracy has no tokens, so the per-client metrics must leave it out.
    """
    rng = np.random.default_rng(10)
    x, y, _ = sequences(120, rng)
    xt, yt, _ = sequences(37, rng)
    owner = rng.integers(0, 4, size=37).astype(np.int32)
    owner[[3, 11, 20]] = 4
    yt[[3, 11, 20]] = np.where(yt[[3, 11, 20]] >= 0, V - 1, -1)
    ds = data.from_arrays(
        x, y, xt, yt, num_clients=6, num_classes=V, compact=True, accuracy_ignore=IGNORE
    )
    return dataclasses.replace(ds, test_client=owner)


def test_evaluation_equals_a_numpy_recount(eval_dataset):
    ds = eval_dataset
    assert ds.target_shape == (T,) and ds.accuracy_ignore == IGNORE
    model = lstm()
    algo = algorithms.fed_avg(
        model,
        client_optimizer=optax.sgd(1.0),
        server_optimizer=optax.sgd(1.0),
        epochs=2,
        batch_size=8,
    )
    # eval_batch_size 8 does not divide 37: padded test rows must count nowhere.
    result = simulate.run(
        algo, ds, rounds=2, clients_per_round=3, eval_every=2, seed=0, progress=False,
        eval_batch_size=8,
    )  # fmt: skip
    last = result.history[-1]
    logits = np.asarray(model.apply(result.state.params, jnp.asarray(ds.test_x)), np.float64)
    y = ds.test_y
    real = y >= 0
    counted = real & ~np.isin(y, IGNORE)
    right = (np.argmax(logits, -1) == y) & counted
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, np.maximum(y, 0)[..., None], -1)[..., 0]
    assert last["test_accuracy"] == pytest.approx(right.sum() / counted.sum(), abs=1e-6)
    assert last["test_loss"] == pytest.approx(ce[real].mean(), rel=1e-5)
    # The ignored ids matter: counting them would give another accuracy.
    assert right.sum() > 0 and (real & ~counted).sum() > 0
    every_real = ((np.argmax(logits, -1) == y) & real).sum() / real.sum()
    assert abs(last["test_accuracy"] - every_real) > 1e-3
    # Per test client, over the counted tokens (not the sequences).
    correct = np.bincount(ds.test_client, right.sum(1), 5)
    tokens = np.bincount(ds.test_client, counted.sum(1), 5)
    assert tokens[4] == 0 and (tokens[:4] > 0).all()
    per_client = correct[:4] / tokens[:4]
    assert last["test_accuracy_clients_mean"] == pytest.approx(per_client.mean(), abs=1e-6)
    assert last["test_accuracy_clients_p10"] == pytest.approx(
        np.percentile(per_client, 10), abs=1e-6
    )
    assert last["test_accuracy_clients_weighted"] == pytest.approx(
        right.sum() / counted.sum(), abs=1e-6
    )
    # Counting sequences instead of tokens per client would give another mean.
    sequences_per_client = np.bincount(ds.test_client, minlength=5)[:4]
    assert abs((correct[:4] / sequences_per_client).mean() - per_client.mean()) > 1e-3


# -- 5. models ------------------------------------------------------------------------


def test_lstm_last_position_is_the_sequence_model():
    x, _, _ = sequences(6, np.random.default_rng(11), min_length=T)
    per_position, last_only = lstm(True), lstm(False)
    params = per_position.init(jax.random.key(1))
    chex.assert_trees_all_equal_structs(params, last_only.init(jax.random.key(1)))
    out = np.asarray(per_position.apply(params, x))
    assert out.shape == (6, T, V)
    np.testing.assert_allclose(out[:, -1], last_only.apply(params, x), rtol=1e-5, atol=1e-6)


def test_transformer_is_causal_and_its_last_position_is_the_sequence_model():
    rng = np.random.default_rng(12)
    x, _, _ = sequences(4, rng, min_length=T)
    per_position = models.create("transformer-8-1-2", feature_shape=(T,), num_classes=V,
                                 per_position=True)  # fmt: skip
    last_only = models.create("transformer-8-1-2", feature_shape=(T,), num_classes=V)
    params = per_position.init(jax.random.key(2))
    out = np.asarray(per_position.apply(params, x))
    assert out.shape == (4, T, V)
    np.testing.assert_allclose(out[:, -1], last_only.apply(params, x), rtol=1e-5, atol=1e-6)
    for t in range(T - 1):
        later = x.copy()
        later[:, t + 1 :] = 1 + (later[:, t + 1 :] % (V - 1))  # every later token changes
        moved = np.asarray(per_position.apply(params, later))
        np.testing.assert_allclose(moved[:, : t + 1], out[:, : t + 1], rtol=1e-5, atol=1e-6)
        assert np.abs(moved[:, t + 1 :] - out[:, t + 1 :]).max() > 1e-4


# -- 6. and 8. the command, every algorithm, and its one-line errors ----------------------

USER_MODULE = textwrap.dedent(
    f"""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from fedjax_kd import data

    V, T = {V}, {T}


    def _arrays(n, rng, dtype):
        x = rng.integers(1, V, size=(n, T)).astype(np.int32)
        y = ((3 * x + 1) % V).astype(np.int32)
        pad = np.arange(T)[None] >= rng.integers(1, T + 1, size=n)[:, None]
        x[pad], y[pad] = 0, -1
        return x.astype(dtype), y


    def _load(seed, dtype, compact):
        rng = np.random.default_rng(seed)
        (x, y), (xt, yt) = _arrays(120, rng, dtype), _arrays(30, rng, dtype)
        return data.from_arrays(
            x, y, xt, yt, num_clients=6, num_classes=V, compact=compact,
            accuracy_ignore=(V - 1,), proxy_fraction=0.2,
        )


    def load(seed=0):
        return _load(seed, np.int32, True)


    def load_float(seed=0):
        return _load(seed, np.float32, False)


    def load_short_targets(seed=0):
        rng = np.random.default_rng(seed)
        (x, y), (xt, yt) = _arrays(60, rng, np.int32), _arrays(10, rng, np.int32)
        return data.from_arrays(
            x, y[:, :-1], xt, yt[:, :-1], num_clients=6, num_classes=V, compact=True
        )


    def load_dict(seed=0):
        rng = np.random.default_rng(seed)
        (x, y), (xt, yt) = _arrays(120, rng, np.int32), _arrays(30, rng, np.int32)
        return {{"x_train": x, "y_train": y, "x_test": xt, "y_test": yt, "num_classes": V,
                "compact": True, "accuracy_ignore": (V - 1,)}}


    def load_dict_typo(seed=0):
        return {{**load_dict(seed), "acuracy_ignore": (1,)}}


    class LastOnly(nnx.Module):
        def __init__(self, num_classes, rngs):
            self.embed = nnx.Embed(num_classes, 4, rngs=rngs)
            self.head = nnx.Linear(4, num_classes, rngs=rngs)

        def __call__(self, x):
            return self.head(self.embed(x)[:, -1])


    def last_only(feature_shape, num_classes, rngs):
        return LastOnly(num_classes, rngs)
    """
)

ALGORITHMS = [
    "fedavg", "fedprox", "teacher_student", "feddf", "fedntd", "fedkd", "fedmd", "dsfl", "fd",
]  # fmt: skip

TINY = [
    "--config.rounds=1", "--config.eval_every=1", "--config.clients_per_round=3",
    "--config.client.epochs=1", "--config.client.batch_size=8", "--config.data.partition=iid",
    "--config.data.proxy_fraction=0.2", "--config.server.distill_steps=2",
    "--config.fedmd.public_size=8", "--config.dsfl.public_size=8",
    "--config.model.student=lstm-4-8", "--config.model.teacher=lstm-4-8", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("next_token_user")
    (folder / "next_token_user.py").write_text(USER_MODULE)
    return str(folder)


@pytest.fixture
def user_module(user_folder, monkeypatch):
    monkeypatch.syspath_prepend(user_folder)
    return "next_token_user"


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_runs_on_per_position_targets(tmp_path, capsys, user_module, name):
    workdir = tmp_path / name
    argv = ["run", *TINY, f"--config.data.name={user_module}:load"]
    argv += [f"--config.algorithm.name={name}", "--workdir", str(workdir)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    summary = json.loads((workdir / "summary.json").read_text())
    assert np.isfinite(summary["test_accuracy"]) and 0.0 <= summary["test_accuracy"] <= 1.0
    assert np.isfinite(summary["test_loss"]) and summary["rounds"] == 1


def test_a_label_partition_of_per_position_targets_is_refused():
    x, y, _ = sequences(40, np.random.default_rng(13))
    with pytest.raises(ValueError, match="per position"):
        data.from_arrays(x, y, x[:5], y[:5], num_clients=4, partition="dirichlet", alpha=0.5)
    ds = data.from_arrays(x, y, x[:5], y[:5], num_clients=4, partition="iid", compact=True)
    assert ds.target_shape == (T,) and int(np.sum(ds.train.count)) == 40


@pytest.mark.parametrize(
    "loader,message",
    [
        ("load_float", "mlp-8 gives one prediction per example, and the targets are per position"),
        ("load", "mlp-8 takes features"),
    ],
)
def test_a_non_sequence_model_is_one_error_line(capsys, user_module, no_run, loader, message):
    argv = ["run", *TINY, f"--config.data.name={user_module}:{loader}"]
    assert cli.main([*argv, "--config.model.student=mlp-8"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "config key 'model.student'" in line and message in line


def test_a_user_model_without_positions_is_one_error_line(capsys, user_module, no_run):
    argv = ["run", *TINY, f"--config.data.name={user_module}:load"]
    argv += [f"--config.model.student={user_module}:last_only"]
    assert cli.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "config key 'model.student'" in line
    assert f"gives logits of shape (2, {V})" in line and f"must give (2, {T}, {V})" in line


def test_a_loader_dict_can_keep_tokens_and_ignore_ids(user_module):
    from fedjax_kd import experiment

    config = experiment.resolve(
        overrides=[("data.name", f"{user_module}:load_dict"), ("data.partition", "iid")]
    )
    ds = experiment.build_dataset(config)
    assert ds.train.x.dtype == np.int32 and ds.accuracy_ignore == (V - 1,)
    assert ds.target_shape == (T,) and ds.num_classes == V


def test_unknown_keys_of_a_loader_dict_are_one_error_line(capsys, user_module, no_run):
    argv = ["run", *TINY, f"--config.data.name={user_module}:load_dict_typo"]
    assert cli.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "returned unknown keys ['acuracy_ignore']" in line


def test_inputs_longer_than_the_targets_are_one_error_line(capsys, user_module, no_run):
    """A built-in sequence model predicts at every input position: T inputs need T targets."""
    argv = ["run", *TINY, f"--config.data.name={user_module}:load_short_targets"]
    assert cli.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"gives logits of shape (2, {T}, {V})" in line and f"must give (2, {T - 1}, {V})" in line


def test_public_set_monitoring_loss_is_a_mean_over_positions():
    """FedMD's / DS-FL's digest on public sequences: uniform logits against soft
    targets give soft cross-entropy log C at every position, so the mean is log C
    (a sum over positions would be T log C)."""
    from fedjax_kd.algorithms.personal import target_loss

    def apply(params, x):
        return jnp.zeros((*x.shape, V)) + 0.0 * params["w"]

    p, num = 6, 8
    targets = jax.nn.softmax(jax.random.normal(jax.random.key(0), (num, T, V)), -1)
    _, metrics = client.local_train(
        target_loss(apply, losses.soft_cross_entropy),
        {"w": jnp.zeros(())},
        optax.sgd(0.1),
        {"x": jnp.ones((num, T), jnp.int32), "targets": targets},
        jnp.asarray(p),
        jax.random.key(1),
        epochs=1,
        batch_size=4,
    )
    np.testing.assert_allclose(float(metrics["train_loss"]), math.log(V), rtol=1e-6)
