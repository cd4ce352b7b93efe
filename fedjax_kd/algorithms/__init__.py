"""Federated algorithms, one file each; every builder returns a FederatedAlgorithm."""

from fedjax_kd.algorithms.ditto import ditto
from fedjax_kd.algorithms.ds_fl import ds_fl
from fedjax_kd.algorithms.fd import fd
from fedjax_kd.algorithms.fed_avg import fed_avg
from fedjax_kd.algorithms.fed_df import fed_df
from fedjax_kd.algorithms.fed_dyn import fed_dyn
from fedjax_kd.algorithms.fed_kd import fed_kd
from fedjax_kd.algorithms.fed_md import fed_md
from fedjax_kd.algorithms.fed_nova import fed_nova
from fedjax_kd.algorithms.fed_ntd import fed_ntd
from fedjax_kd.algorithms.fed_prox import fed_prox
from fedjax_kd.algorithms.scaffold import scaffold
from fedjax_kd.algorithms.teacher_student import teacher_student


def _specs() -> dict:
    import importlib

    modules = ("fed_avg", "fed_prox", "teacher_student", "fed_df", "fed_ntd", "fed_kd")
    modules += ("fed_md", "ds_fl", "fd", "fed_nova", "scaffold", "ditto", "fed_dyn")
    specs = [importlib.import_module(f"fedjax_kd.algorithms.{m}").SPEC for m in modules]
    return {spec.name: spec for spec in specs}


#: The built-in algorithms' specs by ``algorithm.name`` (each module's ``SPEC``).
SPECS = _specs()

__all__ = [
    "SPECS",
    "ditto",
    "ds_fl",
    "fd",
    "fed_avg",
    "fed_df",
    "fed_dyn",
    "fed_kd",
    "fed_md",
    "fed_nova",
    "fed_ntd",
    "fed_prox",
    "scaffold",
    "teacher_student",
]
