"""Shared fixtures: small real datasets that compile and run in seconds."""

import os

# The suite is dominated by XLA compile time of many small programs; skipping
# LLVM's backend optimisations halves it. Results are still exact IEEE float
# computations (every comparison in the tests is between programs compiled the
# same way, or against NumPy with a tolerance). Speed is measured in
# experiments/, never here.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

# The commands turn on JAX's persistent compilation cache (fedjax_kd/cache.py);
# in the tests it lives in a fresh directory of this session, never in the
# user's ~/.cache (subprocess runs inherit it, so they share its executables).
if "FEDJAX_KD_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["FEDJAX_KD_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedjax_kd_test_cache_")

import pytest  # noqa: E402

from fedjax_kd import data  # noqa: E402


@pytest.fixture(scope="session")
def digits_small():
    """sklearn digits split over 20 clients with Dirichlet(0.5) label skew."""
    return data.digits(num_clients=20, partition="dirichlet", seed=0, alpha=0.5)


@pytest.fixture(scope="session")
def digits_proxy():
    """digits over 30 clients, Dirichlet(0.5), with a 10% unlabeled server proxy set."""
    return data.digits(num_clients=30, partition="dirichlet", alpha=0.5, seed=0, proxy_fraction=0.1)


@pytest.fixture(scope="session")
def linear():
    """Softmax regression on digits' 64 features, 10 classes."""
    from fedjax_kd import models

    return models.create("linear", feature_shape=(64,), num_classes=10)


@pytest.fixture
def no_run(monkeypatch):
    """Fails the test if a simulation would start (errors must come before compiling)."""
    from fedjax_kd import simulate

    def forbidden(*args, **kwargs):
        raise AssertionError("simulate.run was reached")

    monkeypatch.setattr(simulate, "run", forbidden)
