"""Robust aggregation under attack: every aggregator at 0 / 10 / 20 / 30% attackers.

FedAvg on digits (100 Dirichlet(0.5) clients, 10 per round, MLP-64, E = 5)
for 30 rounds, with each aggregator of ``fedjax_kd.robust`` and two attacks
by ``round(fraction * 10)`` of each round's clients:

* ``scale`` with factor -10 (a scaled sign flip, the simple attack that
  breaks the mean);
* ``alie`` ("A Little Is Enough", Baruch et al., NeurIPS 2019, arXiv
  1902.06156): every attacker sends ``mu - z sigma`` of the honest updates,
  built to stay inside what coordinate-wise and distance-based rules accept.

The aggregators' settings assume up to 3 attackers of 10: Krum and
Multi-Krum (Blanchard et al., NeurIPS 2017, arXiv 1703.02757) with f = 3
(Multi-Krum averages the K - f = 7 best), the trimmed mean (Yin et al., ICML
2018, arXiv 1803.01498) with beta = 0.3, norm bounding (Sun et al., arXiv
1911.07963) at M = 1 and centered clipping (Karimireddy et al., ICML 2021,
arXiv 2012.10333) with tau = 1 (a round-1 update's norm on digits is
0.75-1.2).

Expected (the papers' qualitative claims): the mean collapses under the
scaled attack even at 10%, the robust rules hold; ALIE moves the robust
rules more than the mean, which it barely hurts. The measured table and an
honest reading are in ``experiments/README.md``.

Expected runtime on a 2-core CPU: about 15 minutes (49 settings x 3 seeds,
seeds as one program each)::

    fedjax-kd sweep --config experiments/configs/robust_digits.py \\
        --workdir runs/robust_digits --parallel 3
    fedjax-kd report runs/robust_digits --out experiments/results/robust_digits

``robust_digits.py:smoke`` runs 2 rounds of the median under the scaled
attack for the tests.
"""

import ml_collections

from fedjax_kd.configs import default
from fedjax_kd.robust import AGGREGATORS

FRACTIONS = [0.1, 0.2, 0.3]


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """FedAvg on digits with the aggregators' settings for up to 3 attackers of 10."""
    c = default.get_config()
    c.rounds = 30
    c.eval_every = 10
    c.clients_per_round = 10
    c.server.trim_beta = 0.3
    c.server.krum_f = 3
    c.server.multi_krum_m = 7
    c.server.norm_bound = 1.0
    c.server.clip_tau = 1.0
    c.attack.scale = -10.0
    if variant == "smoke":
        c.rounds = 2
        c.eval_every = 1
        c.client.epochs = 1
        c.server.aggregator = "median"
        c.attack.kind = "scale"
        c.attack.fraction = 0.3
    elif variant is not None:
        raise ValueError(f"unknown variant {variant!r} (known: smoke)")
    return c


def get_sweep(variant: str | None = None) -> dict:
    """Every aggregator clean and under each attack at each fraction, 3 seeds."""
    if variant == "smoke":
        return {"grid": {"server.aggregator": ["median"]}, "seeds": [0]}
    return {
        "grid": [
            {"server.aggregator": list(AGGREGATORS), "attack.fraction": [0.0]},
            {
                "server.aggregator": list(AGGREGATORS),
                "attack.kind": ["scale", "alie"],
                "attack.fraction": FRACTIONS,
            },
        ],
        "seeds": [0, 1, 2],
    }
