"""Shared fixtures: small real datasets that compile and run in seconds."""

import pytest

from fedjax_kd import data


@pytest.fixture(scope="session")
def digits_small():
    """sklearn digits split over 20 clients with Dirichlet(0.5) label skew."""
    return data.digits(num_clients=20, partition="dirichlet", seed=0, alpha=0.5)


@pytest.fixture(scope="session")
def digits_proxy():
    """digits over 30 clients, Dirichlet(0.5), with a 10% unlabeled server proxy set."""
    return data.digits(num_clients=30, partition="dirichlet", alpha=0.5, seed=0, proxy_fraction=0.1)
