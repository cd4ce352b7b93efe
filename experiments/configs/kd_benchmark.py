"""Base config of the KD benchmark (experiments/kd_benchmark.py).

Command (the full grid: 9 algorithms x 2 datasets x 3 alphas x 3 seeds)::

    python experiments/kd_benchmark.py --out experiments/results/kd_benchmark

Every algorithm runs on the same clients, the same held-out unlabeled proxy set
(10% of the training part, used only by the algorithms that distil on the
server or exchange outputs on a public set), the same local training (5 local
epochs: FedDF's gains need long local training, and FedDF's paper compares
at equal local epochs) and the same test set. The teacher of teacher_student
and FedKD's mentor are larger than the student (``DATASET_OVERRIDES``).
FedMD, DS-FL and FD keep one personal model per client; their accuracy is the
mean over ALL clients' models, including clients sampled only a few times.
"""

import ml_collections

from fedjax_kd.configs import default

#: Per dataset: model sizes and client learning rate.
DATASET_OVERRIDES = {
    "digits": {
        "data.name": "digits",
        "data.num_clients": 100,
        "model.student": "mlp-32",
        "model.teacher": "mlp-256-256",
        "model.student_groups": "",
        "client.lr": 0.1,
    },
    "synthetic": {
        "data.name": "synthetic",
        "data.num_clients": 30,
        "synthetic.partition": "dirichlet",
        "model.student": "linear",
        "model.teacher": "mlp-64-64",
        "model.student_groups": "",
        "client.lr": 0.05,
    },
}

#: Per algorithm: what the papers tuned (on top of the base config).
ALGORITHM_OVERRIDES = {
    "fedavg": {},
    "fedprox": {"fedprox.mu": 0.01},
    "fedntd": {"fedntd.beta": 1.0, "fedntd.temperature": 1.0},
    "teacher_student": {"teacher_student.kd_weight": 1.0, "server.distill_steps": 50},
    "feddf": {"server.distill_steps": 50},
    "fedkd": {},
    "fedmd": {"fedmd.public_size": 128},
    "dsfl": {"dsfl.public_size": 128, "dsfl.temperature": 0.1},
    "fd": {"fd.gamma": 1.0},
}


def get_config() -> ml_collections.ConfigDict:
    """Shared settings of every benchmark run."""
    c = default.get_config()
    c.rounds = 50
    c.clients_per_round = 10
    c.eval_every = 5
    c.data.proxy_fraction = 0.1
    c.client.epochs = 5
    c.client.batch_size = 10
    return c
