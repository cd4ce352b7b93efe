"""Padding changes nothing, exactly, for every algorithm (docs/ARCHITECTURE.md, principle 3).

The same clients stored padded to their largest size and to 70 more rows run
different array shapes. Every per-client computation (training steps and the
per-round forward passes: teacher_student's and FedNTD's targets, FD's
per-label statistics, FedKD's mentor loss) runs on blocks of the training
batch's shape (``client.map_batches``), so the runs agree bit for bit on any
one machine (the same program on the same shapes). A plain ``[N, ...]``
forward pass does not: on the development machine a teacher forward over 7
real rows padded to 64 rows already differs in the last bits
(``tests/test_client.py``).
"""

import dataclasses

import chex
import numpy as np
import optax
import pytest

from fedjax_kd import algorithms, compress, models, simulate

EXTRA_ROWS = 70
COMMON = dict(client_optimizer=optax.sgd(0.1), epochs=2, batch_size=8)
SERVER = dict(server_optimizer=optax.sgd(1.0))


@pytest.fixture(scope="module")
def padded_more(digits_proxy):
    """digits_proxy's clients with EXTRA_ROWS more (zero) padding rows each."""
    t = digits_proxy.train
    train = t._replace(
        x=np.pad(t.x, ((0, 0), (0, EXTRA_ROWS), (0, 0))), y=np.pad(t.y, ((0, 0), (0, EXTRA_ROWS)))
    )
    return dataclasses.replace(digits_proxy, train=train)


def build(name, num_clients):
    student = models.create("mlp-16", feature_shape=(64,), num_classes=10)
    teacher = models.create("mlp-32-32", feature_shape=(64,), num_classes=10)
    return {
        "fedavg": lambda: algorithms.fed_avg(student, **COMMON, **SERVER),
        "fedprox": lambda: algorithms.fed_prox(student, mu=0.1, **COMMON, **SERVER),
        "fedntd": lambda: algorithms.fed_ntd(student, beta=1.0, **COMMON, **SERVER),
        "teacher_student": lambda: algorithms.teacher_student(
            student, teacher, kd_weight=0.7, kd_start_round=0, distill_steps=2, **COMMON, **SERVER
        ),
        "feddf": lambda: algorithms.fed_df([student], distill_steps=2, **COMMON, **SERVER),
        "fedkd": lambda: algorithms.fed_kd(
            student,
            teacher,
            num_clients=num_clients,
            energy=compress.energy_schedule(rounds=2),
            **COMMON,
            **SERVER,
        ),
        "fd": lambda: algorithms.fd([student], num_clients=num_clients, num_classes=10, **COMMON),
        "fedmd": lambda: algorithms.fed_md(
            [student], num_clients=num_clients, public_size=32, **COMMON
        ),
        "dsfl": lambda: algorithms.ds_fl(
            [student], num_clients=num_clients, public_size=32, **COMMON
        ),
    }[name]()


@pytest.mark.parametrize(
    "name",
    ["fedavg", "fedprox", "fedntd", "teacher_student", "feddf", "fedkd", "fd", "fedmd", "dsfl"],
)
def test_more_padding_is_bit_identical(digits_proxy, padded_more, name):
    algo = build(name, digits_proxy.train.num_clients)
    runs = [
        simulate.run(algo, ds, rounds=2, clients_per_round=5, eval_every=2, seed=0, progress=False)
        for ds in (digits_proxy, padded_more)
    ]
    assert padded_more.train.x.shape[1] == digits_proxy.train.x.shape[1] + EXTRA_ROWS
    chex.assert_trees_all_equal(runs[0].state, runs[1].state)
    timeless = [[{k: v for k, v in h.items() if k != "wall_s"} for h in r.history] for r in runs]
    assert timeless[0] == timeless[1]
