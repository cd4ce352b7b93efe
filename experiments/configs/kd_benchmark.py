"""Base config of the KD benchmark (experiments/kd_benchmark.py).

Command (the full grid; about 30-40 minutes on a 2-core CPU)::

    python experiments/kd_benchmark.py --out experiments/results/kd_benchmark

Every algorithm runs on the same clients, the same held-out unlabeled proxy set
(10% of the training part, used only by the algorithms that distil on the
server or exchange logits on a public set) and the same test set. Per-algorithm
settings follow the papers' advice: FedDF with longer local training, the
teacher of teacher_student larger than the student (``ALGORITHM_OVERRIDES``).
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
        "data.synthetic_partition": "dirichlet",
        "model.student": "linear",
        "model.teacher": "mlp-64-64",
        "model.student_groups": "",
        "client.lr": 0.05,
    },
}

#: Per algorithm: what the papers tuned (on top of the base config).
ALGORITHM_OVERRIDES = {
    "fedavg": {},
    "fedprox": {"algorithm.mu": 0.01},
    "fedntd": {"algorithm.ntd_beta": 1.0, "algorithm.ntd_tau": 1.0},
    "teacher_student": {"algorithm.kd_weight": 1.0, "server.distill_steps": 50},
    "feddf": {"client.epochs": 10, "server.distill_steps": 50},
}


def get_config() -> ml_collections.ConfigDict:
    """Shared settings of every benchmark run."""
    c = default.get_config()
    c.rounds = 50
    c.clients_per_round = 10
    c.eval_every = 5
    c.data.proxy_fraction = 0.1
    c.client.epochs = 2
    c.client.batch_size = 10
    return c
