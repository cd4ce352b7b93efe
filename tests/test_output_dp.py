"""Output DP: what distillation clients publish, clipped, summed, noised once, divided by K.

Oracles: the clipped sums recomputed in NumPy from each client's own block
(``cohort_pass``, the personal family's one aggregation; ``fedavg_step``'s
ensemble terms, teacher_student's and FedDF's); hand-computed sums and
projections; FD's private table against the per-client tables a plain FD
round stores; the noise's standard deviation over many seeded draws; and the
non-private algorithms themselves (noise 0, a clip norm nothing reaches).
Sources: ``shared/REFERENCES_NEXT.md`` A4, "DP for output sharing and
distillation".
"""

import importlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import cohort_of

from fedjax_kd import aggregate, client, distill, privacy
from fedjax_kd.algorithms import personal
from fedjax_kd.algorithms.ds_fl import ds_fl
from fedjax_kd.algorithms.fd import fd
from fedjax_kd.algorithms.fed_avg import client_inputs, fedavg_step
from fedjax_kd.algorithms.fed_df import fed_df
from fedjax_kd.algorithms.fed_md import fed_md
from fedjax_kd.algorithms.teacher_student import teacher_student
from fedjax_kd.data import Cohort
from fedjax_kd.simulate import jit_round
from fedjax_kd.spec import BuildContext

C = 10
IDS = jnp.array([3, 8, 1, 12], jnp.int32)  # K = 4
PERSONAL = dict(num_clients=30, client_optimizer=optax.sgd(0.1), epochs=1, batch_size=32)
COMMON = dict(
    client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), epochs=1, batch_size=32
)
SERVER = dict(distill_steps=2, distill_batch_size=32)
NOTHING_CLIPS = privacy.DP(clip_norm=1e6, noise_multiplier=0.0)


def flat_norm(a):
    return float(np.linalg.norm(np.ravel(np.asarray(a, np.float64))))


def np_clip(a, s):
    a = np.asarray(a, np.float64)
    norm = np.linalg.norm(a.ravel())
    return a * min(1.0, s / norm) if norm > 0 else a, norm > s


def np_project(m, min_total=0.0):
    """personal.project_rows in NumPy: clip at 0, divide by the row sum; rows kept or zero."""
    pos = np.maximum(m, 0.0)
    total = pos.sum(-1, keepdims=True)
    kept = (m.sum(-1) > min_total) & (total[..., 0] > 0)
    return np.where(kept[..., None], pos / np.where(total > 0, total, 1.0), 0.0), kept


# --- cohort_pass: the personal family's aggregation (FedMD, DS-FL, FD) ---


def upload_pass(data, blocks, dp, key, chunk_size=None):
    """``cohort_pass`` of a cohort whose clients upload ``blocks`` ``[K, ...]``."""
    ids = jnp.arange(blocks.shape[0], dtype=jnp.int32)
    cohort = Cohort.from_data(data, ids, chunk_size=chunk_size)
    stores = (personal.ClientStore.create(lambda k: {"w": jnp.zeros(())}, key, ids),)

    def fn(g, params, clients, inputs):
        return None, {}, inputs["block"]

    return personal.cohort_pass(
        fn, cohort, personal.group_rows(ids, 1), stores, {"block": blocks}, output_dp=dp, dp_key=key
    )


@pytest.fixture(scope="module")
def five_clients(digits_proxy):
    """Five clients' data, the third without examples (count 0)."""
    data = cohort_of(digits_proxy, jnp.arange(5))
    return data._replace(count=data.count.at[2].set(0))


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_every_upload_is_clipped_and_the_sum_divided_by_k(five_clients, chunk_size):
    """Noise 0: (1/K) sum_k clip_S(u_k), the empty client's (huge) upload counting as 0."""
    rng = np.random.default_rng(0)
    blocks = rng.normal(size=(5, 6, 3)).astype(np.float32)
    blocks *= np.array([0.1, 0.4, 50.0, 0.2, 0.05], np.float32)[:, None, None]
    norms = [flat_norm(b) for b in blocks]
    clip = float(np.median([norms[k] for k in (0, 1, 3, 4)]))  # two clipped, two not
    dp = privacy.DP(clip_norm=clip, noise_multiplier=0.0)
    _, per_client, mean = jax.jit(lambda b, key: upload_pass(five_clients, b, dp, key, chunk_size))(
        jnp.asarray(blocks), jax.random.key(0)
    )
    want, clipped = np.zeros((6, 3)), []
    for k in range(5):
        if k == 2:  # no data: uploads zero, still counts in K
            clipped.append(False)
            continue
        c, was = np_clip(blocks[k], clip)
        assert np.linalg.norm(c) <= clip * (1 + 1e-12)
        want += c
        clipped.append(was)
    np.testing.assert_allclose(mean, want / 5, rtol=2e-6, atol=1e-8)
    np.testing.assert_array_equal(per_client["output_clipped"], np.array(clipped, np.float32))
    assert sum(clipped) == 2


def test_nothing_clipped_and_no_noise_is_the_plain_sum_over_k(five_clients):
    """Hand-computed: blocks 1, 2, (ignored), 3, 4 times ones [1, 2]; sum 10, over K = 5."""
    blocks = jnp.array([1.0, 2.0, 1000.0, 3.0, 4.0])[:, None, None] * jnp.ones((5, 1, 2))
    _, per_client, mean = upload_pass(five_clients, blocks, NOTHING_CLIPS, jax.random.key(0), 2)
    np.testing.assert_array_equal(mean, [[2.0, 2.0]])
    np.testing.assert_array_equal(per_client["output_clipped"], np.zeros(5))


def test_noise_std_on_the_aggregate_is_z_s_over_k_once_per_round(five_clients):
    """200 seeds x 200 entries = 40,000 draws of a chunked (3-chunk) cohort's zero uploads.

    The sample std of n = 40,000 Gaussians has relative sd 1/sqrt(2n) = 0.35%:
    the 2.5% tolerance is 7 sd (false alarm below 1e-11); noise added per chunk
    instead of once would give sqrt(3) z S / K, 73% off. The mean's sd is
    0.5% of sigma; 3% is 6 sd.
    """
    dp = privacy.DP(clip_norm=0.7, noise_multiplier=1.3)
    zeros = jnp.zeros((5, 20, 10))
    keys = jax.random.split(jax.random.key(1), 200)
    draws = jax.jit(jax.vmap(lambda key: upload_pass(five_clients, zeros, dp, key, 2)[2]))(keys)
    draws = np.asarray(draws, np.float64)
    sigma = 1.3 * 0.7 / 5
    assert abs(draws.std() / sigma - 1) < 0.025
    assert abs(draws.mean()) < 0.03 * sigma
    assert not np.allclose(draws[0], draws[1])  # every seed its own noise


def test_project_rows_hand_computed():
    noisy = jnp.array([[0.2, -0.1, 0.6], [-0.1, -0.2, 0.1], [-0.3, -0.1, -0.2], [0.05, 0.0, 0.05]])
    rows, kept = personal.project_rows(noisy)
    np.testing.assert_allclose(rows[0], [0.25, 0.0, 0.75], rtol=1e-6)
    np.testing.assert_array_equal(kept, [True, False, False, True])  # row 1 sums to -0.2
    np.testing.assert_array_equal(rows[1:3], 0.0)
    np.testing.assert_allclose(rows[3], [0.5, 0.0, 0.5], rtol=1e-6)
    _, kept = personal.project_rows(noisy, min_total=0.5)
    np.testing.assert_array_equal(kept, [True, False, False, False])
    # Mixing the simplex with itself (no noise) is a fixed point.
    p = jax.nn.softmax(jax.random.normal(jax.random.key(0), (4, 7)))
    np.testing.assert_allclose(personal.project_rows(p)[0], p, rtol=1e-6)


# --- teacher_student's and FedDF's ensemble terms in fedavg_step ---


def test_ensemble_logits_are_clipped_per_client_in_fedavg_step(five_clients, digits_proxy, linear):
    """sum_k clip_S(f_{w_k}(proxy)), in chunks of 2, next to DP-FedAvg (dp) in the same step."""
    proxy = jnp.asarray(digits_proxy.proxy_x)[:32]
    update = client.make_client_update(linear.apply, optax.sgd(0.5), epochs=1, batch_size=32)
    params = linear.init(jax.random.key(0))
    inputs = client_inputs(jax.random.key(3), 5)
    blocks = []
    one = jax.jit(update)
    for k in range(5):
        d = five_clients
        out = one(params, d.x[k], d.y[k], d.count[k], inputs["key"][k])
        local = jax.tree.map(jnp.subtract, params, out.delta)
        blocks.append(np.asarray(linear.apply(local, proxy)) * (k != 2))
    norms = [flat_norm(b) for b in blocks]
    clip = float(np.median([norms[k] for k in (0, 1, 3, 4)]))
    reference = [np_clip(b, clip) for b in blocks]

    def step(inputs):
        return fedavg_step(
            params,
            optax.sgd(1.0).init(params),
            Cohort.from_data(five_clients, jnp.arange(5), chunk_size=2),
            inputs,
            client_update=update,
            server_optimizer=optax.sgd(1.0),
            extra_terms=lambda out: aggregate.ensemble_contribution(
                linear.apply, params, out, proxy, clip_norm=clip
            ),
            dp=NOTHING_CLIPS,
            dp_key=jax.random.key(9),
        ).sums

    sums = jax.jit(step)(inputs)
    want = sum(c for c, _ in reference)
    np.testing.assert_allclose(sums["proxy_logits"], want, rtol=2e-5, atol=1e-5)
    assert float(sums["output_clipped"]) == sum(w for _, w in reference) == 2
    assert float(sums["members"]) == 4 and float(sums["dp_clipped"]) == 0


# --- whole rounds ---


def run_rounds(algo, dataset, rounds=1, data=None):
    """``[(state, metrics)]`` after each of ``rounds`` rounds of cohort ``IDS`` (one compile)."""
    data = cohort_of(dataset, IDS) if data is None else data
    state = algo.init(jax.random.key(0))
    round_fn = jit_round(algo)
    server = {"proxy_x": jnp.asarray(dataset.proxy_x)}
    out = []
    for r in range(rounds):
        state, metrics = round_fn(state, data, jax.random.key(1 + r), server, IDS)
        out.append((state, metrics))
    return out


def builders(linear):
    """Per algorithm: ``make(**privacy_kwargs)`` for one group of the linear model."""
    public = dict(public_size=16, **PERSONAL)
    return {
        "fedmd": lambda **kw: fed_md([linear], digest_batch_size=16, **public, **kw),
        "dsfl": lambda **kw: ds_fl([linear], distill_batch_size=16, **public, **kw),
        "fd": lambda **kw: fd([linear], num_classes=C, label_weighting="uniform", **PERSONAL, **kw),
        "feddf": lambda **kw: fed_df([linear], **SERVER, **COMMON, **kw),
        "teacher_student": lambda **kw: teacher_student(linear, linear, **SERVER, **COMMON, **kw),
    }


@pytest.mark.parametrize("name", ["fedmd", "dsfl"])
def test_no_noise_and_no_clipping_is_the_non_private_round(digits_proxy, linear, name):
    """Every cohort client has data, so sum / K is today's mean: the rounds agree."""
    make = builders(linear)[name]
    [(private, metrics)] = run_rounds(make(output_dp=NOTHING_CLIPS), digits_proxy)
    [(plain, _)] = run_rounds(make(), digits_proxy)
    assert float(metrics["dp_output_clipped_fraction"]) == 0.0 and bool(metrics["finite"])
    for a, b in zip(jax.tree.leaves(private), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture
def distill_targets(monkeypatch):
    """The ensemble targets the server distils from, recorded (the distillation is skipped)."""
    seen = []

    def spy(apply_fn, optimizer, *, steps, batch_size, temperature=1.0):
        def record(params, proxy_x, target, key):
            jax.debug.callback(lambda t: seen.append(np.asarray(t, np.float64)), target)
            return params, {"distill_loss": jnp.zeros((), jnp.float32)}

        return record

    monkeypatch.setattr(distill, "make_server_distill", spy)
    return seen


@pytest.mark.parametrize("name", ["feddf", "teacher_student"])
def test_server_distils_from_the_noised_sum_over_k(digits_proxy, linear, distill_targets, name):
    """The ensemble target: without noise or clipping today's mean logits (and, with
    DP-FedAvg's ``dp``, today's uniformly weighted student); with noise ``z S`` on
    the sum, ``target - mean`` has std ``z S / K`` over the 144 x 10 entries
    (relative sd of the sample std 1/sqrt(2880) = 1.9%; the 10% tolerance is 5 sd,
    false alarm about 1e-6), and the students are untouched by it."""
    make = builders(linear)[name]
    uniform = {"uniform_weighting": True}  # DP-FedAvg counts every client once
    noisy = privacy.DP(clip_norm=1e3, noise_multiplier=1.5)  # no logits block is near 1e3
    [(plain, _)] = run_rounds(make(**uniform), digits_proxy)
    [(private, metrics)] = run_rounds(
        make(dp=NOTHING_CLIPS, output_dp=NOTHING_CLIPS, **uniform), digits_proxy
    )
    [(noised, noised_metrics)] = run_rounds(make(output_dp=noisy, **uniform), digits_proxy)
    mean, same, with_noise = distill_targets
    np.testing.assert_allclose(same, mean, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(private), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(metrics["dp_output_clipped_fraction"]) == 0.0
    assert float(metrics["dp_clipped_fraction"]) == 0.0
    assert float(noised_metrics["dp_output_clipped_fraction"]) == 0.0
    noise = with_noise - mean
    sigma = 1.5 * 1e3 / len(IDS)
    assert abs(noise.std() / sigma - 1) < 0.1 and abs(noise.mean()) < 0.15 * sigma
    for a, b in zip(jax.tree.leaves(noised), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fd_private_table_is_the_projected_clipped_sum_over_k(digits_proxy, linear):
    """FD's private table against the per-client tables a plain FD round stores.

    Round 0 trains without targets either way, so the plain round's stored
    tables are the very blocks the private round published (one client is
    made empty: it uploads zero and still counts in K = 4).
    """
    data = cohort_of(digits_proxy, IDS)
    data = data._replace(count=data.count.at[1].set(0))
    make = builders(linear)["fd"]
    [(plain, _)] = run_rounds(make(), digits_proxy, data=data)
    tables = np.asarray(plain.label_means)[np.asarray(IDS)]
    norms = [flat_norm(t) for t in tables]
    clip = float(np.median([norms[k] for k in (0, 2, 3)]))  # at least one clipped, one not
    dp = privacy.DP(clip_norm=clip, noise_multiplier=0.0)
    (state0, m0), (state1, m1) = run_rounds(make(output_dp=dp), digits_proxy, 2, data)
    reference = [np_clip(t, clip) for t in tables]
    assert 0 < sum(w for _, w in reference) < 3
    want, _ = np_project(sum(c for c, _ in reference) / 4, min_total=0.5 / 4)
    np.testing.assert_allclose(state0.dp_table, want, rtol=1e-5, atol=1e-6)
    assert float(m0["dp_output_clipped_fraction"]) == sum(w for _, w in reference) / 4
    assert int(state0.dp_round) == 0 and int(state1.dp_round) == 1
    # Round 0 sends no table; round 1 sends the private one to everyone.
    assert not np.any(m0["downlink_bytes"]) and np.all(m1["downlink_bytes"] > 0)
    # The server kept no client's table.
    assert not np.any(np.asarray(state1.label_means)) and np.all(state1.upload_round == -1)


# --- off means off; what is refused; what the specs build ---


def round_jaxpr(algo, dataset):
    """The jaxpr of one round on abstract inputs (nothing is computed)."""
    state = jax.eval_shape(algo.init, jax.random.key(0))
    data = jax.eval_shape(lambda: cohort_of(dataset, IDS))
    server = {"proxy_x": jax.ShapeDtypeStruct(dataset.proxy_x.shape, jnp.float32)}

    def fn(state, data, key, server):
        return algo.round(state, Cohort.from_data(data, IDS), key, server)

    key = jax.eval_shape(lambda: jax.random.key(1))
    return str(jax.make_jaxpr(fn)(state, data, key, server))


@pytest.mark.parametrize("name", ["fedmd", "dsfl", "fd", "feddf", "teacher_student"])
def test_output_dp_none_is_the_same_program(digits_proxy, linear, name):
    """``output_dp=None`` (and ``dp=None``) traces to the very program of the plain builder.

    Same jaxpr, same ops: the results are bit-identical. The plain program draws
    nothing from the output-DP stream; the private one does.
    """
    make = builders(linear)[name]
    off = {"output_dp": None}
    if name in ("feddf", "teacher_student"):
        off["dp"] = None
    plain = round_jaxpr(make(), digits_proxy)
    assert round_jaxpr(make(**off), digits_proxy) == plain
    stream = f" {aggregate.OUTPUT_DP_STREAM}:u32[]"  # fold_in(key, OUTPUT_DP_STREAM)
    dp = privacy.DP(clip_norm=1.0, noise_multiplier=1.0)
    private = round_jaxpr(make(output_dp=dp), digits_proxy)
    assert stream not in plain and stream in private


def test_groups_and_bad_settings_are_refused(linear):
    dp = privacy.DP(clip_norm=1.0, noise_multiplier=1.0)
    two = [linear, linear]
    public = dict(public_size=16, **PERSONAL)
    for build in (
        lambda: fed_md(two, output_dp=dp, **public),
        lambda: ds_fl(two, output_dp=dp, **public),
        lambda: fd(two, num_classes=C, label_weighting="uniform", output_dp=dp, **PERSONAL),
        lambda: fed_df(two, output_dp=dp, **COMMON),
        lambda: fed_df(two, dp=dp, **COMMON),
    ):
        with pytest.raises(ValueError, match="one architecture group.*uniform sampling"):
            build()
    with pytest.raises(ValueError, match="label_weighting='uniform'"):
        fd([linear], num_classes=C, output_dp=dp, **PERSONAL)
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        fed_md([linear], output_dp=privacy.DP(0.0, 1.0), **public)
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        teacher_student(linear, linear, dp=privacy.DP(1.0, -1.0), **COMMON)


@pytest.mark.parametrize("module", ["fed_md", "ds_fl", "fd", "fed_df", "teacher_student"])
def test_specs_pass_the_privacy_settings_to_their_builders(digits_proxy, linear, module):
    spec = importlib.import_module(f"fedjax_kd.algorithms.{module}").SPEC
    assert spec.private_outputs
    hp = spec.defaults() | ({"public_size": 16} if "public_size" in spec.hypers else {})
    dp = privacy.DP(clip_norm=1.0, noise_multiplier=1.0)
    ctx = BuildContext(
        hp=hp,
        config=types.SimpleNamespace(server=types.SimpleNamespace(distill_temperature=1.0)),
        dataset=digits_proxy,
        student=linear,
        teacher=linear,
        group_models=[linear],
        common=COMMON,
        personal=PERSONAL,
        stragglers={},
        distill=SERVER,
        robust={"output_dp": dp, "dp": dp},
    )
    algo = spec.build(ctx)
    state = algo.init(jax.random.key(0))
    server = {"proxy_x": jnp.asarray(digits_proxy.proxy_x)}
    _, metrics = jax.eval_shape(
        lambda s, d, k: algo.round(s, Cohort.from_data(d, IDS), k, server),
        state,
        cohort_of(digits_proxy, IDS),
        jax.random.key(1),
    )
    assert "dp_output_clipped_fraction" in metrics
    assert ("dp_clipped_fraction" in metrics) == (module in ("fed_df", "teacher_student"))
