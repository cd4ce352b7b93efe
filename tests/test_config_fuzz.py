"""Property: any value at any key is a valid config or one ConfigError line, never a crash.

Random strings (unicode, empty, import-path-like), integers (huge, negative),
floats (huge, tiny, inf, nan) and booleans go to random keys of the schema,
as ``--config.KEY=VALUE`` strings and as values a config file would set,
through ``experiment.resolve`` (which validates); nothing is compiled or run.
"""

import string

import ml_collections
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedjax_kd import experiment
from fedjax_kd.configs import default

SCHEMA = sorted(experiment._flatten(default.get_config()))
#: The keys that hold names (algorithm, dataset, models, optimizers, options): where an
#: import path or a malformed name is parsed.
NAME_KEYS = sorted(
    k for k, v in experiment._flatten(default.get_config()).items() if isinstance(v, str)
)

# Strings a user might type (and odd ones): unicode, empty, separators, numbers as text,
# import paths that do not resolve (never a real module with side effects).
TEXT = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=string.ascii_letters + string.digits + "-_.:,", max_size=16),
    st.sampled_from(
        [
            "",
            " ",
            "-",
            "mlp-",
            "mlp-0",
            "mlp--8",
            "cnn-8-",
            "linear-3",
            "mlp-1e9",
            ":",
            "a:",
            ":b",
            ".:x",
            "..x:y",
            "no_such_mod_zz:f",
            "fedjax_kd.models:nope",
            "fedjax_kd.models:MODEL_SPECS",
            "mlp-8,",
            ",",
            "mlp-8,,cnn-4",
            "é",
            "\x00",
            "nan",
            "inf",
            "-inf",
            "1e400",
            "true",
            "0x10",
            "1_000",
            " 3 ",
        ]
    ),
)
INTS = st.one_of(
    st.integers(min_value=-3, max_value=70),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**31 - 1, 2**31, -(2**31), 2**32, 10**30]),
)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)
VALUES = st.one_of(TEXT, INTS, FLOATS, st.booleans())
KEYS = st.one_of(st.sampled_from(SCHEMA), st.text(max_size=10))

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,  # the same examples on every run: a failure reproduces
)


def assert_valid_or_one_line(run) -> None:
    try:
        config = run()
    except experiment.ConfigError as e:
        message = str(e)
        assert message and "\n" not in message, repr(message)
    else:
        assert isinstance(config, ml_collections.ConfigDict)
        experiment.validate(config)  # what resolve returned is valid as it is


def _set_any(config, key: str, value) -> None:
    """Sets ``config[key]`` (a dotted key) to ``value`` of any type, as a config file could."""
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value


@FUZZ
@given(st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=3))
def test_overrides_are_valid_or_one_config_error(pairs):
    overrides = [(key, value if isinstance(value, str) else str(value)) for key, value in pairs]
    assert_valid_or_one_line(lambda: experiment.resolve(None, overrides))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(SCHEMA), VALUES), min_size=1, max_size=3))
def test_config_file_values_are_valid_or_one_config_error(pairs):
    """A config file may set a key to a value of any type (a typo'd type, a None, ...)."""
    config = default.get_config()
    for key, value in pairs:
        _set_any(config, key, value)
    assert_valid_or_one_line(lambda: experiment.resolve(config))


@FUZZ
@given(st.sampled_from(SCHEMA), st.one_of(st.none(), st.lists(INTS, max_size=2), st.just({})))
def test_values_of_other_types_are_one_config_error(key, value):
    config = default.get_config()
    _set_any(config, key, value)
    assert_valid_or_one_line(lambda: experiment.resolve(config))


@FUZZ
@given(st.sampled_from(NAME_KEYS), TEXT)
def test_names_are_valid_or_one_config_error(key, text):
    """Model names, import paths, choices: parsed or refused, never a crash."""
    assert_valid_or_one_line(lambda: experiment.resolve(None, [(key, text)]))


def test_the_cases_fuzzing_found():
    """Found by the fuzz above: relative import paths raised TypeError from importlib,
    and an unknown key with a newline made a two-line error."""
    assert_valid_or_one_line(lambda: experiment.resolve(None, [("\n", "1")]))
    assert_valid_or_one_line(lambda: experiment.resolve(None, [("client.lr\nx", "1")]))
    for key in ("data.name", "model.student", "model.student_groups", "algorithm.name"):
        for text in (".:x", "..x:y", "mlp-8,.:x"):
            assert_valid_or_one_line(
                lambda key=key, text=text: experiment.resolve(None, [(key, text)])
            )
