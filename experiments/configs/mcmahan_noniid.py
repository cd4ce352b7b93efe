"""McMahan et al. 2017: more local computation speeds up IID far more than pathological non-IID.

Paper: McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017, arXiv 1602.05629, Table 2: rounds to reach
a target accuracy for FedSGD (E = 1, B = infinity: one full-batch gradient step
per client and round) and FedAvg with more local computation (E = 5 and 20,
B = 10), on IID data and on the pathological non-IID split (sort by label,
shards, 2 shards per client). Here: sklearn digits (8x8) instead of MNIST,
the paper's 2NN shrunk to mlp-200 (one hidden layer), 100 clients, C = 0.1 (10
per round), SGD lr 0.1 for every setting (the paper tuned lr per setting).

Command (2 partitions x 3 local-computation settings x 3 seeds = 18 runs)::

    fedjax-kd sweep --config experiments/configs/mcmahan_noniid.py \
        --workdir runs/mcmahan_noniid
    fedjax-kd report runs/mcmahan_noniid --out experiments/results/mcmahan_noniid \
        --target 0.9

Expected runtime on a 2-core CPU: 10-20 s per run (an evaluation every round),
about 5 minutes for the sweep (measured: 286 s, machine shared).

The paper's claim: FedAvg's speed-up in rounds over FedSGD is much larger for
IID data than for pathological non-IID data (yet still > 1 there). Expected
here (measured, 3 seeds): rounds to 90% test accuracy fall from 47.7 (FedSGD)
to 10.7 (E=5) and 5.3 (E=20) under IID, 4.5x and 9.0x; under the shards split
from 60.0 to 27.0 and 25.0, only 2.2x and 2.4x. Table: experiments/README.md.

Smoke variant (the tests run it through the CLI): ``...mcmahan_noniid.py:smoke``.
"""

import ml_collections

from fedjax_kd.configs import default

#: B = infinity: a batch larger than any client is the client's whole data.
FULL_BATCH = 100_000


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """FedAvg E=5, B=10 on the pathological non-IID split; the sweep varies both."""
    c = default.get_config()
    c.rounds = 300
    c.eval_every = 1  # rounds-to-target needs every round's accuracy
    c.checkpoint_every = 50  # not at every evaluation: saving would dominate
    c.clients_per_round = 10
    c.data.name = "digits"
    c.data.num_clients = 100
    c.data.partition = "shards"
    c.data.shards_per_client = 2
    c.model.student = "mlp-200"
    c.client.lr = 0.1
    c.client.epochs = 5
    c.client.batch_size = 10
    c.algorithm.name = "fedavg"
    if variant == "smoke":
        c.rounds = 2
        c.eval_every = 1
    elif variant is not None:
        raise ValueError(f"unknown variant {variant!r} (known: smoke)")
    return c


def get_sweep(variant: str | None = None) -> dict:
    """Partitions {iid, shards} x (E, B) in {(1, inf), (5, 10), (20, 10)} x seeds."""
    partitions = {"data.partition": ["iid", "shards"]}
    return {
        "grid": [
            {**partitions, "client.epochs": [1], "client.batch_size": [FULL_BATCH]},
            {**partitions, "client.epochs": [5, 20], "client.batch_size": [10]},
        ],
        "seeds": [0] if variant == "smoke" else [0, 1, 2],
    }
