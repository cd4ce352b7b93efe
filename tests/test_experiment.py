"""Every algorithm is reachable from a config, runs, and is reproducible."""

import pytest

from fedjax_kd import experiment

TINY = [
    ("rounds", "2"),
    ("eval_every", "2"),
    ("clients_per_round", "4"),
    ("data.num_clients", "12"),
    ("data.proxy_fraction", "0.1"),
    ("model.student", "mlp-8"),
    ("model.teacher", "mlp-16"),
    ("client.epochs", "1"),
    ("server.distill_steps", "3"),
    ("fedmd.public_size", "32"),
    ("dsfl.public_size", "32"),
]


def run(overrides):
    return experiment.run(experiment.resolve(overrides=TINY + overrides), progress=False)


@pytest.mark.parametrize("name", experiment.ALGORITHMS)
def test_each_algorithm_runs_from_config(name):
    result = run([("algorithm.name", name)])
    s = result.summary
    assert 0.0 <= s["test_accuracy"] <= 1.0
    assert s["rounds"] == 2 and s["uplink_bytes"] > 0
    assert len(result.history) == 1


@pytest.mark.parametrize("name", ["teacher_student", "dsfl"])
def test_same_seed_same_numbers(name):
    a = run([("algorithm.name", name)]).history
    b = run([("algorithm.name", name)]).history
    strip = lambda h: [{k: v for k, v in r.items() if k != "wall_s"} for r in h]  # noqa: E731
    assert strip(a) == strip(b)


def test_heterogeneous_groups_from_config():
    result = run([("algorithm.name", "feddf"), ("model.student_groups", "mlp-8,linear")])
    assert "group1_linear_test_accuracy" in result.summary
    with pytest.raises(experiment.ConfigError, match="multiple of the 2 model groups"):
        experiment.resolve(
            overrides=TINY
            + [("algorithm.name", "fd"), ("model.student_groups", "mlp-8,linear"),
               ("clients_per_round", "3")]
        )  # fmt: skip


def test_renamed_keys_come_from_the_specs_and_name_real_keys():
    """Each spec lists its old flat keys; the hint table is built from them."""
    from fedjax_kd.configs import default

    schema = experiment._flatten(default.get_config())
    assert experiment.RENAMED_KEYS, "no renamed keys gathered"
    for old, new in experiment.RENAMED_KEYS.items():
        assert old not in schema, old
        for key in new.split(" or "):
            assert key in schema, (old, key)
    # Two specs renamed the same old key: both are named.
    public = experiment.RENAMED_KEYS["algorithm.public_size"]
    assert public == "fedmd.public_size or dsfl.public_size"
    assert experiment.RENAMED_KEYS["algorithm.mu"] == "fedprox.mu"
