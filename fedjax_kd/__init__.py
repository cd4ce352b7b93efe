"""fedjax_kd: federated learning fused with knowledge distillation, in JAX.

Pure functions for client update, aggregation and distillation losses are
``jax.vmap``-ped over simulated clients and compiled into one ``jax.jit``
round. Public API (see ``docs/ARCHITECTURE.md``):

* data: :class:`ClientData`, :class:`FederatedDataset`, ``data.digits``,
  ``data.synthetic``, partitioners in ``data.partition``.
* models: :func:`models.create` (``linear``, ``mlp-W...``, ``cnn-C...``).
* losses: :func:`cross_entropy`, :func:`distillation_loss`, :func:`masked_mean`.
* local training: :func:`make_client_update`.
* algorithms: :func:`fed_avg`, :func:`fed_prox` (any optax server optimizer).
* running: :func:`simulate.run` (library), :func:`experiment.run` (from a config),
  and the ``fedjax-kd`` command.
"""

from fedjax_kd import aggregate, algorithms, data, losses, models, optimizers, simulate
from fedjax_kd.algorithms import fed_avg, fed_prox
from fedjax_kd.client import make_client_update
from fedjax_kd.data import ClientData, FederatedDataset
from fedjax_kd.losses import cross_entropy, distillation_loss, masked_mean
from fedjax_kd.types import ClientOutput, FederatedAlgorithm, ServerState

__version__ = "0.1.0"

__all__ = [
    "ClientData",
    "ClientOutput",
    "FederatedAlgorithm",
    "FederatedDataset",
    "ServerState",
    "aggregate",
    "algorithms",
    "cross_entropy",
    "data",
    "distillation_loss",
    "fed_avg",
    "fed_prox",
    "losses",
    "make_client_update",
    "masked_mean",
    "models",
    "optimizers",
    "simulate",
]
