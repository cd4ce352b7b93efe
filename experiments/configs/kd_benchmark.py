"""The KD family benchmark: every algorithm on digits and Synthetic under Dirichlet label skew.

Papers: FedAvg (McMahan et al., AISTATS 2017, arXiv 1602.05629), FedProx (Li
et al., MLSys 2020, arXiv 1812.06127), FedNTD (Lee et al., NeurIPS 2022,
arXiv 2106.03097), FedDF (Lin et al., NeurIPS 2020, arXiv 2006.07242), FedKD
(Wu et al., Nature Communications 2022, arXiv 2108.13323), FedMD (Li & Wang,
arXiv 1910.03581), DS-FL (Itahara et al., IEEE TMC 2021, arXiv 2008.06180),
FD (Jeong et al., arXiv 1811.11479), and this toolkit's fused teacher_student
loop (no paper). Every algorithm runs on the same clients, the same held-out
unlabeled proxy set (10% of the training part, used only by the algorithms
that distil on the server or exchange outputs on a public set), the same local
training (50 rounds, 10 clients per round, E = 5 local epochs: FedDF's gains
need long local training, and FedDF's paper compares at equal local epochs;
B = 10, SGD) and the same test set. The teacher of teacher_student and FedKD's
mentor are larger than the student (digits: ``get_config``; ``SYNTHETIC``).
FedMD, DS-FL and FD keep one personal model per client; their accuracy is the
mean over ALL clients' models, including clients sampled only a few times.

Command (9 algorithms x {digits, Synthetic} x Dirichlet alpha {0.1, 0.5, 100}
x 3 seeds = 162 runs)::

    fedjax-kd sweep --config experiments/configs/kd_benchmark.py \
        --workdir runs/kd_benchmark
    fedjax-kd report runs/kd_benchmark --out experiments/results/kd_benchmark \
        --columns data.name,data.alpha,algorithm.name \
        --baseline algorithm.name=fedavg --panels data.name,data.alpha

Expected runtime on a 2-core CPU: 3-55 s per run (FedKD and the personal-model
algorithms are the slowest), about 30 minutes for the sweep (measured with the
former driver script: 1689 s, machine otherwise idle).

Expected (measured, 3 seeds; the table is experiments/README.md's): no KD
method beats FedAvg beyond the seeds' spread (e.g. digits alpha 0.1: FedAvg
0.890, FedDF 0.894, teacher_student 0.894 at 36x FedAvg's downlink); FedKD
sends 3-6x fewer uplink bytes for slightly lower accuracy (digits alpha 0.1:
0.8 MB instead of 4.8 MB, 0.867); FedMD, DS-FL and FD are far below FedAvg
(digits alpha 0.1: 0.17-0.22). Seed 0 of digits alpha 0.1 ends at FedAvg
0.894444, teacher_student 0.883333, FedDF 0.900000, FedKD 0.855556 (804,276
uplink / 1,550,880 downlink bytes), FedNTD 0.888889.

Smoke variant (the tests run it through the CLI): ``...kd_benchmark.py:smoke``
(2 rounds, 1 local epoch; its sweep is every algorithm x both datasets at
alpha 0.5, seed 0: 18 runs, about 2 minutes; measured: 102 s).
"""

import ml_collections

from fedjax_kd.configs import default

ALGORITHMS = [
    "fedavg",
    "fedprox",
    "fedntd",
    "teacher_student",
    "feddf",
    "fedkd",
    "fedmd",
    "dsfl",
    "fd",
]
ALPHAS = [0.1, 0.5, 100.0]

#: Synthetic(1, 1)'s clients, models and client lr (digits' are the base config's): 30
#: users' data pooled and re-partitioned with Dirichlet(alpha) label skew over 30 clients.
SYNTHETIC = {
    "data.num_clients": 30,
    "synthetic.partition": "dirichlet",
    "model.student": "linear",
    "model.teacher": "mlp-64-64",
    "client.lr": 0.05,
}


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """teacher_student on digits, alpha 0.5; the sweep varies algorithm, dataset and alpha."""
    c = default.get_config()
    c.rounds = 50
    c.clients_per_round = 10
    c.eval_every = 5
    c.data.name = "digits"
    c.data.partition = "dirichlet"
    c.data.alpha = 0.5
    c.data.proxy_fraction = 0.1
    c.data.num_clients = 100
    c.model.student = "mlp-32"
    c.model.teacher = "mlp-256-256"
    c.model.student_groups = ""
    c.client.lr = 0.1
    c.client.epochs = 5
    c.client.batch_size = 10
    c.algorithm.name = "teacher_student"
    # What the papers tuned, pinned here (each key is read only by its algorithm).
    c.fedprox.mu = 0.01
    c.fedntd.beta = 1.0
    c.fedntd.temperature = 1.0
    c.teacher_student.kd_weight = 1.0
    c.server.distill_steps = 50  # teacher_student and FedDF
    c.fedmd.public_size = 128
    c.dsfl.public_size = 128
    c.dsfl.temperature = 0.1
    c.fd.gamma = 1.0
    if variant == "smoke":
        c.rounds = 2
        c.eval_every = 1
        c.client.epochs = 1
        c.server.distill_steps = 2
    elif variant is not None:
        raise ValueError(f"unknown variant {variant!r} (known: smoke)")
    return c


def get_sweep(variant: str | None = None) -> dict:
    """Algorithms x {digits, Synthetic (with its own models and lr)} x alphas x seeds."""
    grid = {"algorithm.name": ALGORITHMS, "data.alpha": [0.5] if variant == "smoke" else ALPHAS}
    return {
        "grid": [
            {"data.name": ["digits"], **grid},
            {"data.name": ["synthetic"], **grid, **{k: [v] for k, v in SYNTHETIC.items()}},
        ],
        "seeds": [0] if variant == "smoke" else [0, 1, 2],
    }
