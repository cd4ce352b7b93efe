"""Federated algorithms, one file each; every builder returns a FederatedAlgorithm."""

from fedjax_kd.algorithms.fed_avg import fed_avg
from fedjax_kd.algorithms.fed_prox import fed_prox

__all__ = ["fed_avg", "fed_prox"]
