"""Federated data: padded client arrays, partitioners, offline datasets and file readers."""

from fedjax_kd.data.benchmarks import BENCHMARK_SPECS
from fedjax_kd.data.datasets import DATASET_SPECS, DATASETS, digits, from_arrays, synthetic
from fedjax_kd.data.federated import (
    ClientData,
    Cohort,
    FederatedDataset,
    RaggedClientData,
    check_cohort,
    gather_clients,
    gather_cohort,
    pack,
    pack_ragged,
    sample_clients,
)
from fedjax_kd.data.files import CorruptFile, MissingFile
from fedjax_kd.data.partition import PARTITIONERS, dirichlet, iid, quantity, shards

DATASET_SPECS.update(BENCHMARK_SPECS)

__all__ = [
    "BENCHMARK_SPECS",
    "CorruptFile",
    "DATASETS",
    "DATASET_SPECS",
    "PARTITIONERS",
    "ClientData",
    "Cohort",
    "check_cohort",
    "FederatedDataset",
    "MissingFile",
    "RaggedClientData",
    "gather_cohort",
    "pack_ragged",
    "digits",
    "from_arrays",
    "dirichlet",
    "gather_clients",
    "iid",
    "pack",
    "quantity",
    "sample_clients",
    "shards",
    "synthetic",
]
