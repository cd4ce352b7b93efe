"""Accuracy against epsilon: DP-FedAvg beside private distillation (FedDF, DS-FL).

What the founding document calls the first risk of fusing distillation with
FL: what clients publish for distillation leaks too. Here every algorithm
releases only clipped, noised sums, and the same accountant prices them:

* ``fedavg``: DP-FedAvg (McMahan et al., ICLR 2018, arXiv 1710.06963):
  each update clipped to ``dp.clip_norm = 1`` (a round-1 update's norm on
  digits is 0.75-1.2), one Gaussian release a round;
* ``feddf`` (Lin et al., NeurIPS 2020, arXiv 2006.07242): DP-FedAvg on the
  updates *and* each client's proxy logits (the ``[P, C]`` block the server
  distils from, clipped to ``dp.output_clip_norm = 30``: the blocks' norms
  are 30-100 on digits), two releases a round on the same cohort, so its
  epsilon at a noise multiplier ``z`` is that of one release of
  ``z / sqrt 2``;
* ``dsfl`` (Itahara et al., arXiv 2008.06180): each client's soft labels on
  the round's 128 public examples (each row a distribution, the block's norm
  at most sqrt(128) = 11.3), clipped to 8, one release a round; its accuracy
  is the mean over the 100 personal models, as always for DS-FL.

Every run: 100 clients (Dirichlet 0.5 label skew), 50 a round drawn
without replacement (so the accountant is RDP under replace-one; q = 0.5),
30 rounds, a 10% proxy set held by the server (FedAvg trains on the same 90%),
noise multiplier z in {1, 2, 4, 8} and a non-private run of each algorithm,
3 seeds; epsilon at delta = 1e-5. The ``mnist1d`` variant is the same on
MNIST-1D with the reference 1-D CNN (``kd_mnist1d.py``'s model and client
settings but E = 2 local epochs) at z in {1, 4}.

Commands (15 and 9 points x 3 seeds; ``--parallel 3`` runs a point's seeds
as one program)::

    fedjax-kd sweep --config experiments/configs/private_distill.py \\
        --workdir runs/private_digits --parallel 3
    fedjax-kd sweep --config experiments/configs/private_distill.py:mnist1d \\
        --workdir runs/private_mnist1d --parallel 3
    python experiments/privacy_tradeoff.py runs/private_digits runs/private_mnist1d \\
        --out experiments/results/private_distill
    fedjax-kd report runs/private_digits --out experiments/results/private_digits \\
        --columns algorithm.name,dp.noise_multiplier

Expected runtime on a 2-core CPU: digits 3.5 minutes (measured 206 s for the
45 runs), MNIST-1D 15 minutes (890 s for 27, with other work on the CPU).

Expected (the papers' qualitative claim, DP's price): accuracy falls as epsilon
shrinks, and with 50 clients a round the noise swamps the updates at small
epsilon.

The measured table and its reading are in ``experiments/README.md``.
``private_distill.py:smoke`` runs 2 rounds of private FedDF for the tests.
"""

import ml_collections

from fedjax_kd.configs import default

NOISE = [1.0, 2.0, 4.0, 8.0]
#: MNIST-1D's runs are ~10x digits' on 2 cores: two noise levels.
NOISE_MNIST1D = [1.0, 4.0]
#: Each algorithm's DP settings (what it releases) and its non-private twin.
PRIVATE = {
    "fedavg": {"dp.clip_norm": [1.0]},
    "feddf": {"dp.clip_norm": [1.0], "dp.output_clip_norm": [30.0]},
    "dsfl": {"dp.output_clip_norm": [8.0]},
}


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """Digits (or MNIST-1D), 100 clients, 50 a round, 30 rounds, a 10% proxy set."""
    c = default.get_config()
    c.rounds = 30
    c.eval_every = 10
    c.clients_per_round = 50
    c.data.partition = "dirichlet"
    c.data.alpha = 0.5
    c.data.num_clients = 100
    c.data.proxy_fraction = 0.1
    c.server.distill_steps = 20
    c.dsfl.public_size = 128
    c.dsfl.temperature = 0.1
    c.dp.delta = 1e-5
    if variant in ("mnist1d", "mnist1d_smoke"):
        c.data.name = "mnist1d"
        c.model.student = "cnn1d-25-25-25"
        c.client.lr = 0.1
        c.client.epochs = 2  # kd_mnist1d.py's 5 made the sweep too long for 2 cores
        c.client.batch_size = 10
    if variant in ("smoke", "mnist1d_smoke"):
        c.rounds = 2
        c.eval_every = 1
        c.client.epochs = 1
        c.clients_per_round = 10
        c.server.distill_steps = 2
        c.algorithm.name = "feddf"
        c.dp.clip_norm = 1.0
        c.dp.output_clip_norm = 30.0
    elif variant not in (None, "mnist1d"):
        raise ValueError(f"unknown variant {variant!r} (known: smoke, mnist1d, mnist1d_smoke)")
    return c


def get_sweep(variant: str | None = None) -> dict:
    """Each algorithm at every noise multiplier, and once non-private; 3 seeds."""
    if variant in ("smoke", "mnist1d_smoke"):
        return {"grid": {"dp.noise_multiplier": [2.0]}, "seeds": [0]}
    noise = NOISE_MNIST1D if variant == "mnist1d" else NOISE
    grid = []
    for name, settings in PRIVATE.items():
        grid.append({"algorithm.name": [name], **settings, "dp.noise_multiplier": noise})
        grid.append({"algorithm.name": [name]})
    return {"grid": grid, "seeds": [0, 1, 2]}
