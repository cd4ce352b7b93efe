"""The curated top-level API: every exported name resolves, lazily."""

import importlib
import subprocess
import sys

import pytest

import fedjax_kd


def test_every_public_name_resolves_to_its_defining_module():
    from fedjax_kd import aggregate, algorithms, client, cohort, data, losses, models, spec, types

    fed_avg = importlib.import_module("fedjax_kd.algorithms.fed_avg")  # the module

    expected = {
        "fed_avg": algorithms.fed_avg,
        "fed_kd": algorithms.fed_kd,
        "teacher_student": algorithms.teacher_student,
        "fd": algorithms.fd,
        "FederatedAlgorithm": types.FederatedAlgorithm,
        "Cohort": data.Cohort,
        "Model": models.Model,
        "local_train": client.local_train,
        "sum_over_clients": aggregate.sum_over_clients,
        "scan_over_chunks": aggregate.scan_over_chunks,
        "masked_mean": losses.masked_mean,
        "ClientStore": cohort.ClientStore,
        "ModelSpec": spec.ModelSpec,
        "DatasetSpec": spec.DatasetSpec,
        "fedavg_step": fed_avg.fedavg_step,
        "client_inputs": fed_avg.client_inputs,
    }
    for name, value in expected.items():
        assert getattr(fedjax_kd, name) is value, name
    for name in fedjax_kd.__all__:
        assert getattr(fedjax_kd, name) is not None, name
    assert set(algorithms.__all__) - {"SPECS"} <= set(fedjax_kd.__all__)  # every builder
    assert fedjax_kd.AlgorithmSpec is fedjax_kd.spec.AlgorithmSpec
    assert set(fedjax_kd.__all__) <= set(dir(fedjax_kd))
    assert not {"importlib", "annotations"} & set(dir(fedjax_kd))  # no stray helpers
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fedjax_kd.nope  # noqa: B018


def test_import_is_light():
    script = "import sys, fedjax_kd; print(sorted(m for m in ('jax', 'flax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
