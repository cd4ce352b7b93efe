"""fedjax_kd: federated learning fused with knowledge distillation, in JAX.

Pure functions for client update, aggregation and distillation losses are
``jax.vmap``-ped over simulated clients and compiled into one ``jax.jit``
round. The curated public API (see ``docs/ARCHITECTURE.md``):

* algorithms, each a builder returning a :class:`FederatedAlgorithm`:
  :func:`fed_avg`, :func:`fed_prox`, :func:`fed_ntd`,
  :func:`teacher_student`, :func:`fed_df`, :func:`fed_kd`, :func:`fed_md`,
  :func:`ds_fl`, :func:`fd`, :func:`fed_nova`, :func:`scaffold`, :func:`fed_dyn`, :func:`ditto`;
* core types: :class:`FederatedAlgorithm`, :class:`ClientOutput`,
  :class:`ServerState`, :class:`Cohort`, :class:`ClientData`,
  :class:`RaggedClientData`, :class:`FederatedDataset`, :class:`Model`,
  :class:`ClientStore` (per-client state), and the specs components
  describe themselves with, :class:`AlgorithmSpec` (:class:`Hyper`,
  :class:`BuildContext`), :class:`ModelSpec` and :class:`DatasetSpec`;
* primitives: :func:`local_train`, :func:`make_client_update`,
  :func:`map_batches`, :func:`sum_over_clients`, :func:`scan_over_chunks`,
  and the FedAvg family's server side, :func:`fedavg_step` with
  :func:`client_inputs`;
  losses :func:`cross_entropy`, :func:`distillation_loss`,
  :func:`masked_mean`;
* modules: ``data`` (``data.digits``, ``data.synthetic``, partitioners),
  ``models`` (``models.create``: ``linear``, ``mlp-W...``, ``cnn-C...``),
  ``losses``, ``aggregate``, ``optimizers``, ``simulate``
  (:func:`simulate.run`, the library's run loop), ``experiment``
  (:func:`experiment.run`, a run from a config) and ``parallel``
  (:func:`parallel.run_all`, sweep points as one program), and the
  ``fedjax-kd`` command.

Names are imported on first use (PEP 562), so ``import fedjax_kd`` and the
``fedjax-kd --help`` / ``report`` commands start without importing JAX.
"""

import importlib as _importlib

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported when first used).
_EXPORTS = {
    # Algorithms.
    "ditto": "fedjax_kd.algorithms",
    "ds_fl": "fedjax_kd.algorithms",
    "fd": "fedjax_kd.algorithms",
    "fed_avg": "fedjax_kd.algorithms",
    "fed_df": "fedjax_kd.algorithms",
    "fed_dyn": "fedjax_kd.algorithms",
    "fed_kd": "fedjax_kd.algorithms",
    "fed_md": "fedjax_kd.algorithms",
    "fed_nova": "fedjax_kd.algorithms",
    "fed_ntd": "fedjax_kd.algorithms",
    "fed_prox": "fedjax_kd.algorithms",
    "scaffold": "fedjax_kd.algorithms",
    "teacher_student": "fedjax_kd.algorithms",
    # Core types.
    "ClientOutput": "fedjax_kd.types",
    "FederatedAlgorithm": "fedjax_kd.types",
    "ServerState": "fedjax_kd.types",
    "ClientData": "fedjax_kd.data",
    "Cohort": "fedjax_kd.data",
    "FederatedDataset": "fedjax_kd.data",
    "RaggedClientData": "fedjax_kd.data",
    "Model": "fedjax_kd.models",
    "ClientStore": "fedjax_kd.cohort",
    "AlgorithmSpec": "fedjax_kd.spec",
    "BuildContext": "fedjax_kd.spec",
    "DatasetSpec": "fedjax_kd.spec",
    "Hyper": "fedjax_kd.spec",
    "ModelSpec": "fedjax_kd.spec",
    # Primitives.
    "client_inputs": "fedjax_kd.algorithms.fed_avg",
    "fedavg_step": "fedjax_kd.algorithms.fed_avg",
    "local_train": "fedjax_kd.client",
    "make_client_update": "fedjax_kd.client",
    "map_batches": "fedjax_kd.client",
    "scan_over_chunks": "fedjax_kd.aggregate",
    "sum_over_clients": "fedjax_kd.aggregate",
    "cross_entropy": "fedjax_kd.losses",
    "distillation_loss": "fedjax_kd.losses",
    "masked_mean": "fedjax_kd.losses",
}

#: Public submodules (``fedjax_kd.data`` etc.), also imported when first used.
_MODULES = (
    "aggregate",
    "algorithms",
    "checkpoint",
    "client",
    "cohort",
    "compress",
    "data",
    "distill",
    "experiment",
    "losses",
    "models",
    "optimizers",
    "parallel",
    "simulate",
    "spec",
    "types",
)

__all__ = sorted([*_EXPORTS, *_MODULES])


def __getattr__(name: str):
    """Imports a public name or submodule on first access (PEP 562)."""
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(_EXPORTS[name]), name)
    elif name in _MODULES:
        value = _importlib.import_module(f"fedjax_kd.{name}")
    else:
        raise AttributeError(f"module 'fedjax_kd' has no attribute {name!r}")
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    """The public names, for ``dir(fedjax_kd)`` and tab completion."""
    return sorted({*globals(), *__all__})
