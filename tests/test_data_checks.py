"""Data that cannot be trained on is refused in one line before anything compiles."""

import dataclasses
import textwrap

import numpy as np
import pytest
from helpers import one_error_line

from fedjax_kd import cli, experiment

LOADERS = textwrap.dedent(
    """
    import numpy as np
    from fedjax_kd import data


    def _arrays():
        rng = np.random.default_rng(0)
        x = rng.normal(size=(120, 6)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int32)
        return x, y


    def with_nan():
        x, y = _arrays()
        x[7, 2] = np.nan
        return {"x_train": x[:100], "y_train": y[:100], "x_test": x[100:], "y_test": y[100:]}


    def with_inf_test():
        x, y = _arrays()
        x[110, 0] = np.inf
        return {"x_train": x[:100], "y_train": y[:100], "x_test": x[100:], "y_test": y[100:]}


    def bad_labels():
        x, y = _arrays()
        ds = data.from_arrays(x[:100], y[:100], x[100:], y[100:], num_clients=10)
        train = ds.train._replace(y=np.where(ds.train.mask(), 5, 0).astype(np.int32))
        import dataclasses
        return dataclasses.replace(ds, train=train)
    """
)


@pytest.fixture
def loaders(tmp_path, monkeypatch):
    (tmp_path / "bad_data.py").write_text(LOADERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "bad_data"


TINY = ["--config.rounds=1", "--config.eval_every=1", "--config.clients_per_round=3",
        "--config.data.num_clients=10", "--config.data.partition=iid", "--no-progress"]  # fmt: skip


@pytest.mark.parametrize(
    "loader,message",
    [
        ("with_nan", "its training features hold NaN or Inf"),
        ("with_inf_test", "its test features hold NaN or Inf"),
        ("bad_labels", "its training labels lie in [5, 5], outside [0, 2)"),
    ],
)
def test_bad_values_are_one_error_line(capsys, loaders, no_run, loader, message):
    assert cli.main(["run", *TINY, f"--config.data.name={loaders}:{loader}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"data ({loaders}:{loader})" in line and message in line


def test_an_empty_population_is_refused(digits_small):
    train = digits_small.train._replace(count=np.zeros_like(digits_small.train.count))
    with pytest.raises(experiment.ConfigError, match="every client is empty"):
        experiment.check_data_values(dataclasses.replace(digits_small, train=train))


def test_clean_data_passes_and_per_position_targets_may_be_minus_one(digits_small):
    experiment.check_data_values(digits_small)  # raises nothing
    from fedjax_kd import data

    x = np.ones((20, 4), np.int32)
    y = np.full((20, 4), -1, np.int32)
    y[:, 0] = 2
    ds = data.from_arrays(x, y, x[:4], y[:4], num_clients=4, num_classes=3, compact=True)
    experiment.check_data_values(ds)
    bad = dataclasses.replace(ds, test_y=np.full_like(ds.test_y, -2))
    with pytest.raises(
        experiment.ConfigError, match=r"test labels lie in \[-2, -2\], outside \[-1, 3\)"
    ):
        experiment.check_data_values(bad)
