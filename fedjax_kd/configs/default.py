"""The embedded default: FedAvg on sklearn digits, 100 clients, Dirichlet(0.5) label skew.

Command::

    fedjax-kd run

Every config file (``fedjax-kd run --config FILE``) starts from this one, and
its keys are the complete set that ``--config.KEY=VALUE`` may override: the
core sections, and one namespace per algorithm built from its spec
(``fedprox.mu``, ...; a user's algorithm, ``algorithm.name=package.module:SPEC``,
brings its own).
Expected: test accuracy >= 0.90 after 100 rounds, well under a minute on a
2-core CPU (README states the measured number).
"""

import ml_collections

from fedjax_kd import algorithms
from fedjax_kd.data import DATASET_SPECS

#: Top-level sections of the config; no algorithm may be named like one.
SECTIONS = ("data", "model", "client", "algorithm", "server")


def add_component(config: ml_collections.ConfigDict, spec) -> None:
    """Adds an algorithm's or a dataset's options to ``config`` under ``spec.name``.

    Raises:
      ValueError: the name is a top-level key, or another namespace already.
    """
    if spec.name in SECTIONS or (spec.name in config and spec.name not in _namespaces(config)):
        raise ValueError(f"the name {spec.name!r} clashes with the config key {spec.name!r}")
    if spec.hypers:
        config[spec.name] = ml_collections.ConfigDict(spec.defaults())


def _namespaces(config) -> set:
    return {k for k, v in config.items() if isinstance(v, ml_collections.ConfigDict)} - set(
        SECTIONS
    )


def get_config() -> ml_collections.ConfigDict:
    """Returns the default configuration (every key the runner understands)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.rounds = 100
    c.clients_per_round = 10
    c.eval_every = 10
    c.eval_batch_size = 1024
    # Clients vmapped together; chunks run in sequence, so memory grows with the
    # chunk, not with clients_per_round (0 = the whole cohort at once).
    c.client_chunk_size = 0
    # Rounds run inside one compiled loop between host syncs (never across an
    # evaluation or checkpoint); fewer dispatches, results equal up to float
    # rounding (any grouping of rounds into blocks gives the same bits).
    c.rounds_per_call = 1
    # With --workdir: checkpoint into WORKDIR/checkpoints/ every this many rounds
    # and after the last; 0 = at every evaluation. A rerun resumes from there.
    c.checkpoint_every = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"  # digits | synthetic | mnist1d | mnist | femnist | ... (fedjax-kd list)
    # or package.module:function (a user's loader)
    c.data.dir = ""  # the folder of a dataset read from files (mnist, cifar10, femnist, ...)
    c.data.num_clients = 100
    c.data.partition = "dirichlet"  # iid | dirichlet | shards | quantity (digits)
    c.data.alpha = 0.5  # Dirichlet concentration (partition=dirichlet)
    c.data.min_client_size = 2  # guaranteed examples per client (dirichlet, quantity)
    c.data.shards_per_client = 2  # partition=shards
    c.data.quantity_sigma = 1.0  # lognormal sigma of client sizes (partition=quantity)
    # Unlabeled server proxy set held out of the training data (FedDF,
    # teacher_student, FedMD, DS-FL need one): fraction of the training part.
    c.data.proxy_fraction = 0.0
    # Each dataset's own options under its name (digits.test_fraction, synthetic.alpha, ...),
    # from its spec (fedjax_kd/data/datasets.py).
    for dataset_spec in DATASET_SPECS.values():
        add_component(c, dataset_spec)

    c.model = ml_collections.ConfigDict()
    c.model.student = "mlp-64"  # linear | mlp-W1[-W2...] | cnn-C1[-C2...]
    c.model.teacher = "mlp-256-256"  # teacher_student's teacher, FedKD's mentor
    # Heterogeneous clients (feddf, fedmd, dsfl, fd): comma-separated model names,
    # client i gets group i % G; empty = every client uses model.student.
    c.model.student_groups = ""

    c.client = ml_collections.ConfigDict()
    c.client.optimizer = "sgd"  # sgd | momentum | adam
    c.client.lr = 0.1
    c.client.momentum = 0.9  # client.optimizer=momentum
    c.client.epochs = 5
    c.client.batch_size = 10
    # Per-round cap on a client's examples: a larger client trains on a random
    # window of this many (heavy-tailed Synthetic users); 0 = no cap.
    c.client.max_examples = 1024
    # FedProx's systems heterogeneity (the FedAvg family: fedavg, fedprox, fedntd,
    # teacher_student, feddf, fedkd): this fraction of
    # each cohort are stragglers that run U{1..E-1} local epochs, or are dropped
    # (client.drop_stragglers, FedAvg's rule in the FedProx paper).
    # On-device augmentation of image clients' training data, once per round
    # (none | flip | crop | crop+flip; crop pads by client.crop_padding pixels).
    c.client.augment = "none"
    c.client.crop_padding = 4
    c.client.straggler_fraction = 0.0
    c.client.drop_stragglers = False

    c.algorithm = ml_collections.ConfigDict()
    # A built-in name (fedjax-kd list) or a user's spec, package.module:SPEC.
    c.algorithm.name = "fedavg"
    c.algorithm.uniform_weighting = False  # average clients uniformly, not by examples
    # Each algorithm's hyperparameters under its own name (fedprox.mu, fedkd.energy_start,
    # ...), from its spec (fedjax_kd/algorithms/<file>.py: SPEC).
    for spec in algorithms.SPECS.values():
        add_component(c, spec)

    c.server = ml_collections.ConfigDict()
    c.server.optimizer = "sgd"  # sgd | avgm | adam | yogi | adagrad
    c.server.lr = 1.0
    c.server.momentum = 0.9  # avgm
    c.server.b1 = 0.9  # adam, yogi
    c.server.b2 = 0.99  # adam, yogi
    c.server.eps = 1e-3  # adam, yogi, adagrad (Reddi et al.'s tau)
    # Server-side ensemble distillation on the proxy set (teacher_student, feddf):
    # FedDF's optimizer (clip 5, Adam) with this learning rate.
    c.server.distill_steps = 50
    c.server.distill_lr = 1e-3
    c.server.distill_batch_size = 128
    c.server.distill_temperature = 1.0
    # Robust aggregation for the FedAvg family (fedavg, fedprox, fedntd):
    # mean | median | trimmed_mean | krum | multi_krum | norm_bound | centered_clip.
    # Every rule but mean keeps the round's K updates at once (K x the model).
    c.server.aggregator = "mean"
    c.server.trim_beta = 0.1  # trimmed_mean: drop this fraction at each end
    c.server.krum_f = 1  # krum, multi_krum: the attackers assumed
    c.server.multi_krum_m = 0  # multi_krum: updates averaged (0 = K - f)
    c.server.norm_bound = 1.0  # norm_bound: the L2 bound M of each update
    c.server.clip_tau = 1.0  # centered_clip: the radius tau
    c.server.clip_iters = 3  # centered_clip: iterations
    # Leave a client whose update is NaN/Inf out of the round (counted as
    # dropped_nonfinite) instead of stopping the run (fedavg, fedprox, fedntd).
    c.server.drop_nonfinite = False
    # Uplink compression of the clients' updates (fedavg, fedprox, fedntd; bytes
    # from the encoding), at most one: unbiased stochastic b-bit quantization,
    # top-k sparsification (fraction of each tensor's entries kept), FedKD's SVD
    # (energy fraction kept); 0 = dense float32. error_feedback: each client adds
    # the residual its codec left out to its next update (state per client).
    c.client.quantize_bits = 0
    c.client.topk_fraction = 0.0
    c.client.svd_energy = 0.0
    c.client.error_feedback = False

    # Malicious clients (the FedAvg family): round(fraction * K) of each cohort
    # attack: none | sign_flip | scale | noise | label_flip | alie | ipm.
    c.attack = ml_collections.ConfigDict()
    c.attack.kind = "none"
    c.attack.fraction = 0.0
    c.attack.scale = 10.0  # scale: the factor
    c.attack.noise_std = 1.0  # noise: the std of the update sent
    c.attack.epsilon = 0.1  # ipm: attackers send -epsilon x the benign mean

    # User-level DP-FedAvg (fedavg, fedprox, fedntd; teacher_student and feddf too):
    # every client's update clipped to dp.clip_norm, Gaussian noise of std
    # noise_multiplier x clip_norm on the sum, divided by the (expected) cohort;
    # epsilon at dp.delta in every record.
    c.dp = ml_collections.ConfigDict()
    c.dp.clip_norm = 0.0  # 0 = no DP
    c.dp.noise_multiplier = 1.0
    c.dp.delta = 1e-5
    c.dp.epsilon_budget = 0.0  # > 0: stop at the last round within this epsilon
    # fixed: K of N without replacement (replace-one, RDP); poisson: each client
    # joins with probability K/N (add/remove-one, RDP or PLD).
    c.dp.sampling = "fixed"
    c.dp.accountant = "rdp"  # rdp | pld (pld: Poisson sampling only)
    # Poisson's padded cohort: 0 = the smallest that overflows w.p. <= 1e-6 over the run
    # (smaller is refused: an overflowing round is not the accounted mechanism).
    c.dp.max_cohort = 0
    # Adaptive clipping (Andrew et al. 2021): dp.clip_norm is the initial C; the
    # sum's noise is then z_delta x C and the unclipped count's std count_stddev,
    # z_delta chosen so that the round's total noise multiplier stays
    # dp.noise_multiplier (which must be below 2 x count_stddev).
    c.dp.adaptive = False
    c.dp.target_quantile = 0.5
    c.dp.clip_learning_rate = 0.2
    c.dp.count_stddev = 0.0  # 0 = clients_per_round / 20
    # DP for what distillation publishes (fedmd, ds_fl, fd; the proxy logits of
    # teacher_student and feddf): each client's output block clipped to this L2
    # norm, noise of std noise_multiplier x output_clip_norm on the sum. 0 = off.
    c.dp.output_clip_norm = 0.0
    return c
