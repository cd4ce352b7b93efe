"""Named optax optimizers for clients and server.

Server optimizers act on the pseudo-gradient ``delta = global - mean(client)``
(Reddi et al., "Adaptive Federated Optimization", ICLR 2021, arXiv 2003.00295;
Hsu et al. 2019, arXiv 1909.06335 for FedAvgM):

* ``sgd``: ``optax.sgd(lr)``; ``lr = 1`` is plain FedAvg.
* ``avgm``: ``optax.sgd(lr, momentum)`` (FedAvgM).
* ``adam``: ``optax.adam(lr, b1, b2, eps)`` (FedAdam).
* ``yogi``: ``optax.yogi(lr, b1, b2, eps)`` (FedYogi).
* ``adagrad``: ``optax.adagrad(lr, eps=eps)`` (FedAdagrad).

Deviation from Reddi et al.: optax's adam and yogi apply bias correction to
their moments, Reddi's Algorithm 2 does not. ``eps`` plays the role of Reddi's
adaptivity ``tau`` (default 1e-3 as in the paper's grids), not optax's 1e-8.
"""

from __future__ import annotations

import optax

SERVER_OPTIMIZERS = ("sgd", "avgm", "adam", "yogi", "adagrad")
CLIENT_OPTIMIZERS = ("sgd", "momentum", "adam")


def server_optimizer(
    name: str,
    *,
    lr: float,
    momentum: float = 0.9,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-3,
) -> optax.GradientTransformation:
    """Returns the server optimizer called ``name`` (see module docstring)."""
    if name == "sgd":
        return optax.sgd(lr)
    if name == "avgm":
        return optax.sgd(lr, momentum=momentum)
    if name == "adam":
        return optax.adam(lr, b1=b1, b2=b2, eps=eps)
    if name == "yogi":
        return optax.yogi(lr, b1=b1, b2=b2, eps=eps)
    if name == "adagrad":
        return optax.adagrad(lr, eps=eps)
    raise ValueError(f"unknown server optimizer {name!r}; expected one of {SERVER_OPTIMIZERS}")


def client_optimizer(
    name: str, *, lr: float, momentum: float = 0.9
) -> optax.GradientTransformation:
    """Returns the client optimizer ``sgd``, ``momentum`` (SGD with momentum) or ``adam``."""
    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=momentum)
    if name == "adam":
        return optax.adam(lr)
    raise ValueError(f"unknown client optimizer {name!r}; expected one of {CLIENT_OPTIMIZERS}")
