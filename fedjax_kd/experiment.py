"""From a config to a run: loading, overriding, validating and building.

This is the only library module (with ``cli.py``) that reads configs; it maps
config keys to the keyword arguments of datasets, models, optimizers and
algorithm builders, which never see a config themselves.

Configs are Python files with ``get_config()`` returning an
``ml_collections.ConfigDict`` (the convention of the Flax examples and
big_vision). The embedded default (``fedjax_kd/configs/default.py``) is the
schema: a config may only use its keys, with values of the same type.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax

from fedjax_kd import (
    algorithms,
    augment,
    checkpoint,
    cohort,
    models,
    optimizers,
    privacy,
    resources,
    robust,
    simulate,
)
from fedjax_kd import data as data_lib
from fedjax_kd import workdir as workdir_lib
from fedjax_kd.configs import default as default_config
from fedjax_kd.configs import flatten
from fedjax_kd.data import DATASET_SPECS, PARTITIONERS, CorruptFile, FederatedDataset, MissingFile
from fedjax_kd.spec import AlgorithmSpec, BuildContext, DataContext
from fedjax_kd.spec import _never as _never_needs_proxy
from fedjax_kd.types import FederatedAlgorithm

#: The built-in algorithms' names (their specs: ``fedjax_kd.algorithms.SPECS``).
ALGORITHMS = tuple(algorithms.SPECS)


class ConfigError(ValueError):
    """A user mistake in a config, an override or a config file (one-line message)."""


@contextlib.contextmanager
def user_code(file: str | os.PathLike, what: str):
    """Runs a config file's code in a guard: whatever it raises becomes one ConfigError.

    ``SystemExit`` (a ``sys.exit(3)`` in the file), ``KeyboardInterrupt`` and
    any exception become a one-line ConfigError naming ``file`` and ``what``
    (``"get_config()"``, ``"get_sweep()"``, ...); a ConfigError passes through.

    Example::

      with experiment.user_code(path, "get_sweep()"):
          sweep = module.get_sweep()
    """
    try:
        yield
    except ConfigError:
        raise
    except SystemExit as e:
        code = "" if e.code is None else repr(e.code)
        raise ConfigError(f"config file {file}: {what} called sys.exit({code})") from None
    except KeyboardInterrupt:
        raise ConfigError(f"config file {file}: interrupted in {what}") from None
    except BaseException as e:  # a user's file can fail in any way; report it in one line
        message = " ".join(str(e).split())  # one line, whatever the exception's text
        raise ConfigError(
            f"config file {file}: {what} failed: {type(e).__name__}: {message}"
        ) from None


def load_config_module(path: str | os.PathLike):
    """Executes the config file ``PATH`` or ``PATH:VARIANT``; returns ``(module, file, variant)``.

    The text is split at its last ``:`` only when it is not itself a file and
    the part before the ``:`` is one (``variant`` is None otherwise).

    Raises:
      ConfigError: an empty path, a missing file, an empty variant, or
        anything raised while executing the file, ``SystemExit`` and
        ``KeyboardInterrupt`` included (as one line, :func:`user_code`).
    """
    text = os.fspath(path)
    if not text.strip():
        raise ConfigError("--config: the path is empty; give a config file (PATH[:VARIANT])")
    file, variant = Path(text), None
    if not file.is_file() and ":" in text:
        head, tail = text.rsplit(":", 1)
        if Path(head).is_file():
            file, variant = Path(head), tail
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    if variant == "":
        raise ConfigError(f"config file {file}: empty variant after ':'")
    spec = importlib.util.spec_from_file_location(f"_fedjax_kd_config_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load config file {file}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    with user_code(file, "its import"):
        spec.loader.exec_module(module)
    return module, file, variant


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Loads the config of the Python file ``PATH`` or ``PATH:VARIANT``.

    ``PATH`` calls the file's ``get_config()``; ``PATH:VARIANT`` calls
    ``get_config("VARIANT")`` (big_vision's convention), e.g.
    ``experiments/configs/my.py:smoke``. The text is split at its last ``:``
    only when it is not itself a file and the part before the ``:`` is one. A
    file whose ``get_config`` takes no argument has no variants; one whose
    ``get_config`` needs an argument must be given a variant.

    Raises:
      ConfigError: missing file, no ``get_config``, a variant it cannot take,
        or any exception raised by the file (all as one line).
    """
    import inspect

    module, path, variant = load_config_module(path)
    with user_code(path, "get_config()" if variant is None else f"get_config({variant!r})"):
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {path} defines no get_config()")
        try:
            params = list(inspect.signature(module.get_config).parameters.values())
        except (TypeError, ValueError):  # no signature (a builtin): let the call decide
            params = None
        positional = (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.VAR_POSITIONAL,
        )
        takes_variant = params is None or any(p.kind in positional for p in params)
        needs_variant = params is not None and any(
            p.kind in positional[:2] and p.default is inspect.Parameter.empty for p in params
        )
        if variant is not None:
            if not takes_variant:
                raise ConfigError(
                    f"config file {path}: get_config() takes no variant, got ':{variant}'"
                )
            config = module.get_config(variant)
        else:
            if needs_variant:
                raise ConfigError(
                    f"config file {path}: get_config() needs a variant (use {path}:VARIANT)"
                )
            config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() in {path} must return an ml_collections.ConfigDict")
    return config


def _type_name(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), type(value).__name__
    )


def _coerce(key: str, value, like):
    """Returns ``value`` converted to the type of ``like``, or raises ConfigError."""
    if isinstance(like, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
    elif isinstance(like, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif isinstance(like, float):
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
            return number
    elif isinstance(like, str):
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}' must be {_type_name(like)}, got {value!r}")


def _flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _set(config: ml_collections.ConfigDict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value


def resolve(
    config: ml_collections.ConfigDict | None = None,
    overrides: Iterable[tuple[str, str]] = (),
) -> ml_collections.ConfigDict:
    """Checks ``config`` against the default schema, applies overrides, validates.

    Args:
      config: a config (default: the embedded default). Keys missing from it
        take the default's values.
      overrides: ``(dotted_key, value_string)`` pairs, applied in order.

    Returns:
      A complete, validated ConfigDict.

    Raises:
      ConfigError: unknown key, wrong type or out-of-range value.
    """
    resolved = default_config.get_config()
    given = _flatten(config) if config is not None else {}
    items = list(given.items()) + list(overrides)
    # A user's algorithm brings its namespace: add it before checking any key.
    for name in dict.fromkeys(str(v) for k, v in items if k == "algorithm.name"):
        if models.is_import_path(name):
            default_config.add_component(resolved, user_algorithm_spec(name))
    schema = _flatten(resolved)
    for key, value in items:
        if key not in schema:
            raise ConfigError(f"unknown config key {key!r}{_did_you_mean(key, schema)}")
        _set(resolved, key, _coerce(key, value, schema[key]))
    validate(resolved)
    return resolved


def _renamed_keys() -> dict[str, str]:
    """Old flat keys -> their namespaced names, from the specs' ``renamed``."""
    renamed: dict[str, list[str]] = {}
    for spec in [*algorithms.SPECS.values(), *DATASET_SPECS.values()]:
        for old, hyper in spec.renamed.items():
            renamed.setdefault(old, []).append(f"{spec.name}.{hyper}")
    return {old: " or ".join(new) for old, new in renamed.items()}


#: Keys of the flat schema before each algorithm and dataset had its namespace,
#: gathered from the specs (``AlgorithmSpec.renamed``, ``DatasetSpec.renamed``).
RENAMED_KEYS = _renamed_keys()


def _did_you_mean(key: str, known: Iterable[str]) -> str:
    """A hint for the unknown ``key`` (``"; did you mean 'K'?"``), or "".

    Tried in order: a key of the old flat schema (:data:`RENAMED_KEYS`); the
    same key in another case; a section given as a key (``client``); a key
    below a leaf (``client.lr.x``); the same last part in another section
    (``clinet.epochs``, ``epochs``); a close last part in the same section
    (``client.epoch``); a close key anywhere, also with ``_`` left out
    (``fedkd.energystart``).
    """
    import difflib

    if key in RENAMED_KEYS:
        return f"; it is now '{RENAMED_KEYS[key]}' (each algorithm and dataset has its own keys)"
    known = list(known)

    def hint(names: list[str]) -> str:
        if len(names) == 1:
            return f"; did you mean '{names[0]}'?"
        return "; did you mean one of " + ", ".join(f"'{n}'" for n in names[:3]) + "?"

    folded = {k.lower(): k for k in known}
    if key.lower() in folded:
        return hint([folded[key.lower()]])
    below = [k for k in known if k.lower().startswith(key.lower() + ".")]
    if below:
        shown = ", ".join(below[:3]) + (", ..." if len(below) > 3 else "")
        keys = f"one of its {len(below)} keys" if len(below) > 1 else "its key"
        return f"; '{key}' is a section: set {keys} ({shown})"
    above = [k for k in known if key.lower().startswith(k.lower() + ".")]
    if above:
        return hint(above[:1])
    *head, last = key.lower().split(".")
    same_last = [k for k in known if k.lower().split(".")[-1] == last]
    if same_last:
        same_last.sort(key=lambda k: -difflib.SequenceMatcher(None, key.lower(), k.lower()).ratio())
        return hint(same_last)
    section = ".".join(head)
    siblings = [k for k in known if (k.lower().rsplit(".", 1)[0] if "." in k else "") == section]
    started = [k for k in siblings if k.lower().split(".")[-1].startswith(last)]
    if last and started:
        return hint(started)
    for pool in (siblings, known):
        by_key = {k.lower(): k for k in pool}
        close = difflib.get_close_matches(key.lower(), list(by_key), n=1, cutoff=0.6)
        if close:
            return hint([by_key[close[0]]])
    squeezed = {k.lower().replace("_", ""): k for k in known}
    close = difflib.get_close_matches(key.lower().replace("_", ""), list(squeezed), n=1, cutoff=0.8)
    return hint([squeezed[close[0]]]) if close else ""


def user_algorithm_spec(path: str) -> AlgorithmSpec:
    """The :class:`~fedjax_kd.spec.AlgorithmSpec` a user's ``package.module:SPEC`` names.

    ``SPEC`` may be the spec itself or a function without arguments returning one.

    Raises:
      ConfigError: it does not resolve, or is not a spec.
    """
    try:
        found = models.resolve_import_path(path)
        if callable(found) and not isinstance(found, AlgorithmSpec):
            found = found()
    except ValueError as e:
        raise ConfigError(f"config key 'algorithm.name': {e}") from None
    except (Exception, SystemExit) as e:  # a user's module or function failed: one line
        message = " ".join(str(e).split())
        raise ConfigError(
            f"config key 'algorithm.name': {path} raised {type(e).__name__}: {message}"
        ) from None
    if not isinstance(found, AlgorithmSpec):
        raise ConfigError(
            f"config key 'algorithm.name': {path} is not a fedjax_kd.spec.AlgorithmSpec "
            f"(got {type(found).__name__})"
        )
    taken = {*default_config.get_config().keys(), *algorithms.SPECS, *DATASET_SPECS}
    if not found.name.isidentifier() or found.name in taken:
        raise ConfigError(
            f"config key 'algorithm.name': {path} is named {found.name!r}, which "
            + ("is not an identifier" if not found.name.isidentifier() else "is taken")
            + "; give the spec a name of its own (it becomes its config namespace)"
        )
    return found


def describe_components(specs: Iterable[AlgorithmSpec] | None = None) -> str:
    """What ``fedjax-kd list`` prints: algorithms with their keys, models, datasets.

    Generated from the specs (``fedjax_kd.algorithms.SPECS``, or ``specs``).
    """
    specs = list(algorithms.SPECS.values() if specs is None else specs)
    lines = ["algorithms (--config.algorithm.name=NAME, or package.module:SPEC):"]
    lines += _describe_specs(specs)
    lines += [
        "",
        "models (--config.model.student / model.teacher / model.student_groups):",
        *(
            f"  {m.pattern:<16} {m.help}" + (f" ({m.sizes}), e.g. {m.example}" if m.sizes else "")
            for m in models.MODEL_SPECS.values()
        ),
        "  pkg.mod:function a user's Flax NNX or Linen model (README: bring your own)",
        "",
        "datasets (--config.data.name):",
        *_describe_specs(DATASET_SPECS.values()),
        "  pkg.mod:function a user's arrays or FederatedDataset (README: bring your own)",
        "",
        f"partitions (--config.data.partition): {', '.join(PARTITIONERS)}",
    ]
    return "\n".join(lines)


def _describe_specs(specs) -> list[str]:
    """Two-space lines per spec: name and help, needs/supports, then each option."""
    lines = []
    for spec in specs:
        lines.append(f"  {spec.name:<16} {spec.help}")
        needs = [*spec.supports()] if isinstance(spec, AlgorithmSpec) else []
        if isinstance(spec, AlgorithmSpec) and spec.needs_proxy is not _never_needs_proxy:
            needs.append("proxy set (data.proxy_fraction)")
        if needs:
            lines.append(f"  {'':<16} supports/needs: {', '.join(needs)}")
        for hyper_name, hyper in spec.hypers.items():
            key = f"{spec.name}.{hyper_name}"
            allowed = hyper.allowed or (" | ".join(hyper.choices) if hyper.choices else "")
            detail = f"{hyper.help}" + (f" ({allowed})" if allowed else "")
            lines.append(f"    {key} = {_format_default(hyper.default)}: {detail}")
    return lines


def _format_default(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _algorithm_spec(config: ml_collections.ConfigDict) -> AlgorithmSpec:
    """The spec of ``config.algorithm.name``: a built-in or a user's import path."""
    name = config.algorithm.name
    if models.is_import_path(name):
        return user_algorithm_spec(name)
    if name not in algorithms.SPECS:
        raise ConfigError(
            f"config key 'algorithm.name' must be one of {', '.join(ALGORITHMS)} "
            f"(or package.module:SPEC), got {name!r}"
        )
    return algorithms.SPECS[name]


def _check(ok: bool, key: str, allowed: str, value) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' must be {allowed}, got {value!r}")


def _choice(config, key: str, choices: Iterable[str]) -> None:
    value = _flatten(config)[key]
    choices = list(choices)
    _check(value in choices, key, "one of " + ", ".join(choices), value)


def _own_clients(config: ml_collections.ConfigDict) -> bool:
    """Whether the dataset's files, not ``data.num_clients``, fix the clients (natural FEMNIST)."""
    spec = DATASET_SPECS.get(config.data.name)
    if spec is None or not spec.own_clients:
        return False
    return config[spec.name][spec.partition_option] == "natural"


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first key whose value is not allowed."""
    c = config
    rules = [
        ("seed", 0 <= c.seed < 2**32, "in [0, 2**32)"),
        ("rounds", c.rounds >= 1, ">= 1"),
        ("data.num_clients", c.data.num_clients >= 1, ">= 1"),
        ("clients_per_round", c.clients_per_round >= 1, ">= 1"),
        (
            "clients_per_round",
            c.clients_per_round <= c.data.num_clients or _own_clients(c),
            f"<= data.num_clients ({c.data.num_clients})",
        ),
        ("eval_every", c.eval_every >= 1, ">= 1"),
        ("eval_batch_size", c.eval_batch_size >= 1, ">= 1"),
        ("client_chunk_size", c.client_chunk_size >= 0, ">= 0 (0 = whole cohort)"),
        ("rounds_per_call", c.rounds_per_call >= 1, ">= 1"),
        ("checkpoint_every", c.checkpoint_every >= 0, ">= 0 (0 = at every evaluation)"),
        ("client.max_examples", c.client.max_examples >= 0, ">= 0 (0 = no cap)"),
        ("data.alpha", c.data.alpha > 0, "> 0"),
        ("data.min_client_size", c.data.min_client_size >= 1, ">= 1"),
        ("data.shards_per_client", c.data.shards_per_client >= 1, ">= 1"),
        ("data.quantity_sigma", c.data.quantity_sigma >= 0, ">= 0"),
        ("client.lr", c.client.lr > 0, "> 0"),
        ("client.momentum", 0 <= c.client.momentum < 1, "in [0, 1)"),
        ("client.epochs", c.client.epochs >= 1, ">= 1"),
        ("client.batch_size", c.client.batch_size >= 1, ">= 1"),
        ("client.crop_padding", c.client.crop_padding >= 0, ">= 0"),
        (
            "client.straggler_fraction",
            0 <= c.client.straggler_fraction <= 1,
            "in [0, 1]",
        ),
        ("data.proxy_fraction", 0 <= c.data.proxy_fraction < 1, "in [0, 1)"),
        ("server.distill_steps", c.server.distill_steps >= 0, ">= 0"),
        ("server.distill_lr", c.server.distill_lr > 0, "> 0"),
        ("server.distill_batch_size", c.server.distill_batch_size >= 1, ">= 1"),
        ("server.distill_temperature", c.server.distill_temperature > 0, "> 0"),
        ("server.lr", c.server.lr > 0, "> 0"),
        ("server.momentum", 0 <= c.server.momentum < 1, "in [0, 1)"),
        ("server.b1", 0 <= c.server.b1 < 1, "in [0, 1)"),
        ("server.b2", 0 <= c.server.b2 < 1, "in [0, 1)"),
        ("server.eps", c.server.eps > 0, "> 0"),
        ("server.trim_beta", 0 <= c.server.trim_beta < 0.5, "in [0, 0.5)"),
        ("server.krum_f", c.server.krum_f >= 0, ">= 0"),
        ("server.multi_krum_m", c.server.multi_krum_m >= 0, ">= 0 (0 = K - f)"),
        ("server.norm_bound", c.server.norm_bound > 0, "> 0"),
        ("server.clip_tau", c.server.clip_tau > 0, "> 0"),
        ("server.clip_iters", c.server.clip_iters >= 1, ">= 1"),
        ("attack.fraction", 0 <= c.attack.fraction < 1, "in [0, 1)"),
        ("dp.clip_norm", c.dp.clip_norm >= 0, ">= 0 (0 = no DP)"),
        ("client.quantize_bits", 0 <= c.client.quantize_bits <= 16, "in [0, 16] (0 = off)"),
        ("client.topk_fraction", 0 <= c.client.topk_fraction <= 1, "in [0, 1] (0 = off)"),
        ("client.svd_energy", 0 <= c.client.svd_energy <= 1, "in [0, 1] (0 = off)"),
        ("dp.noise_multiplier", c.dp.noise_multiplier >= 0, ">= 0"),
        ("dp.delta", 0 < c.dp.delta < 1, "in (0, 1)"),
        ("dp.epsilon_budget", c.dp.epsilon_budget >= 0, ">= 0 (0 = none)"),
        ("dp.sampling", c.dp.sampling in privacy.SAMPLINGS, f"one of {privacy.SAMPLINGS}"),
        ("dp.accountant", c.dp.accountant in privacy.ACCOUNTANTS, f"one of {privacy.ACCOUNTANTS}"),
        ("dp.max_cohort", c.dp.max_cohort >= 0, ">= 0 (0 = automatic)"),
        ("dp.target_quantile", 0 < c.dp.target_quantile < 1, "in (0, 1)"),
        ("dp.clip_learning_rate", c.dp.clip_learning_rate > 0, "> 0"),
        ("dp.count_stddev", c.dp.count_stddev >= 0, ">= 0 (0 = clients_per_round / 20)"),
        ("dp.output_clip_norm", c.dp.output_clip_norm >= 0, ">= 0 (0 = off)"),
        ("attack.noise_std", c.attack.noise_std >= 0, ">= 0"),
    ]
    flat = _flatten(c)
    for key, value in flat.items():  # integers size int32 arrays and loops
        if isinstance(value, int) and not isinstance(value, bool) and key != "seed":
            _check(-(2**31) <= value < 2**31, key, "an int32, below 2**31 in magnitude", value)
    for key, ok, allowed in rules:
        _check(ok, key, allowed, flat[key])
    if models.is_import_path(c.data.name):
        _import_function(c.data.name, "data.name")
    else:
        _choice(c, "data.name", DATASET_SPECS)
    _choice(c, "data.partition", PARTITIONERS)
    for dataset_spec in DATASET_SPECS.values():  # every dataset namespace, whichever runs
        _check_hypers(dataset_spec, flat)
    _choice(c, "client.optimizer", optimizers.CLIENT_OPTIMIZERS)
    _choice(c, "client.augment", augment.AUGMENTATIONS)
    spec = _algorithm_spec(c)
    specs = {**algorithms.SPECS, spec.name: spec}
    for other in specs.values():  # every namespace in the config, whichever runs
        _check_hypers(other, flat)
    _choice(c, "server.optimizer", optimizers.SERVER_OPTIMIZERS)
    _choice(c, "server.aggregator", robust.AGGREGATORS)
    _choice(c, "attack.kind", robust.ATTACKS)
    for key in ("model.student", "model.teacher"):
        _check_model_name(flat[key], key)
    for name in _group_names(c):
        _check_model_name(name, "model.student_groups")
    name = spec.name
    if spec.needs_proxy(c) and c.data.proxy_fraction == 0:
        raise ConfigError(
            f"algorithm '{name}' distils on a server proxy set: set data.proxy_fraction > 0 "
            "(e.g. --config.data.proxy_fraction=0.1)"
        )
    if c.client.straggler_fraction > 0 and not spec.stragglers:
        with_stragglers = [s.name for s in algorithms.SPECS.values() if s.stragglers]
        raise ConfigError(
            f"config key 'client.straggler_fraction': algorithm '{name}' has no stragglers; "
            f"they work with {', '.join(with_stragglers)}"
        )
    if c.client.straggler_fraction > 0 and not c.client.drop_stragglers and c.client.epochs < 2:
        raise ConfigError(
            "config key 'client.straggler_fraction': stragglers run U{1..E-1} local epochs, "
            "which needs client.epochs >= 2 (or client.drop_stragglers=true)"
        )
    if c.client.drop_stragglers and round(c.client.straggler_fraction * c.clients_per_round) >= (
        c.clients_per_round
    ):
        raise ConfigError(
            f"config key 'client.straggler_fraction': {c.client.straggler_fraction} of "
            f"{c.clients_per_round} clients per round would drop every client "
            "(client.drop_stragglers=true); lower it"
        )
    misbehaving = c.attack.kind != "none" and c.attack.fraction > 0
    if not spec.robust:  # the FedAvg family's server-side options, each refused in one line
        specs = algorithms.SPECS.values()
        takes = ", ".join(s.name for s in specs if s.robust)
        option = "server.aggregator" if c.server.aggregator != "mean" else "attack.kind"
        codec = _codec_key(c)
        refusals = [
            (
                codec is not None,
                f"config key '{codec}': algorithm '{name}' sends no dense update to "
                f"compress here; uplink codecs work with {takes}",
            ),
            (
                c.server.drop_nonfinite,
                f"config key 'server.drop_nonfinite': algorithm '{name}' cannot drop clients' "
                f"updates; dropping non-finite updates works with {takes}",
            ),
            (
                c.dp.clip_norm > 0 and not spec.private_updates,
                "config key 'dp.clip_norm': DP-FedAvg works with "
                f"{', '.join(s.name for s in specs if s.private_updates or s.robust)}, "
                f"not algorithm '{name}'",
            ),
            (
                c.dp.sampling != "fixed",
                f"config key 'dp.sampling': Poisson sampling works with {takes}, "
                f"not algorithm '{name}'",
            ),
            (
                c.server.aggregator != "mean" or misbehaving,
                f"config key '{option}': algorithm '{name}' aggregates no client updates this "
                f"way; robust aggregation and attacks work with {takes}",
            ),
        ]
        for refused, message in refusals:
            if refused:
                raise ConfigError(message)
    codec = _codec_key(c)
    codecs = [k for k in ("quantize_bits", "topk_fraction", "svd_energy") if c.client[k]]
    if len(codecs) > 1:
        raise ConfigError(
            f"config key 'client.{codecs[1]}': choose one uplink codec, not "
            f"{' and '.join('client.' + k for k in codecs)}"
        )
    if codec is not None and c.dp.clip_norm > 0:
        raise ConfigError(
            f"config key '{codec}': DP-FedAvg's clipping bound does not survive a lossy "
            "uplink codec; use one or the other"
        )
    if c.client.error_feedback and codec is None:
        raise ConfigError(
            "config key 'client.error_feedback': it feeds back what an uplink codec leaves "
            "out; set client.topk_fraction, client.svd_energy or client.quantize_bits"
        )
    if c.dp.clip_norm > 0 and (c.server.aggregator != "mean" or misbehaving):
        raise ConfigError(
            "config key 'dp.clip_norm': DP-FedAvg averages clipped updates; it does not "
            "combine with server.aggregator or attack.kind"
        )
    attackers = round(c.attack.fraction * c.clients_per_round)
    if misbehaving and attackers == 0:
        raise ConfigError(
            f"config key 'attack.fraction': {c.attack.fraction} of {c.clients_per_round} "
            "clients per round rounds to no attacker; raise it"
        )
    if misbehaving and attackers >= c.clients_per_round:
        raise ConfigError(
            f"config key 'attack.fraction': {c.attack.fraction} of {c.clients_per_round} "
            "clients per round leaves no honest client; lower it"
        )
    if c.attack.kind != "none" and c.attack.fraction == 0:
        raise ConfigError(
            f"config key 'attack.fraction': attack.kind={c.attack.kind} with fraction 0 "
            "attacks nobody; set attack.fraction (e.g. 0.2) or attack.kind=none"
        )
    if c.attack.kind == "alie" and misbehaving and 2 * attackers >= c.clients_per_round:
        raise ConfigError(
            f"config key 'attack.fraction': ALIE assumes fewer than half the clients attack, "
            f"got {attackers} of {c.clients_per_round}"
        )
    if c.server.aggregator in ("krum", "multi_krum"):
        if c.clients_per_round < 2 * c.server.krum_f + 3:
            raise ConfigError(
                f"config key 'server.krum_f': Krum needs clients_per_round > 2 f + 2; "
                f"{c.clients_per_round} clients per round allow f <= "
                f"{max((c.clients_per_round - 3) // 2, 0)}, got {c.server.krum_f}"
            )
        if c.server.multi_krum_m > c.clients_per_round:
            raise ConfigError(
                f"config key 'server.multi_krum_m': {c.server.multi_krum_m} is more than the "
                f"{c.clients_per_round} clients per round"
            )
    _check_dp(c, spec)
    groups = len(_group_names(c))
    if groups > 1 and not spec.groups:
        with_groups = [s.name for s in algorithms.SPECS.values() if s.groups]
        raise ConfigError(
            f"config key 'model.student_groups': algorithm '{name}' needs one model; "
            f"heterogeneous groups work with {', '.join(with_groups)}"
        )
    if groups > 1 and c.clients_per_round % groups:
        raise ConfigError(
            f"config key 'clients_per_round' must be a multiple of the {groups} model groups, "
            f"got {c.clients_per_round}"
        )


def _check_hypers(spec, flat: dict) -> None:
    """ConfigError for the first of ``spec``'s options (``<name>.<option>``) out of range."""
    for hyper_name, hyper in spec.hypers.items():
        key = f"{spec.name}.{hyper_name}"
        message = hyper.error(key, flat[key])
        if message:
            raise ConfigError(message)


def _check_model_name(name: str, key: str) -> None:
    """A built-in model name, or a user's ``package.module:function`` that resolves."""
    if models.is_import_path(name):
        _import_function(name, key)
        return
    try:
        models.parse_name(name)
    except ValueError as e:
        raise ConfigError(f"config key '{key}': {e}") from None


def _import_function(path: str, key: str):
    """The function a user's ``package.module:function`` (config key ``key``) names.

    Importing runs the user's module: whatever it raises (a relative name such
    as ``.:f``, an exception, ``sys.exit``) becomes one ConfigError line.
    """
    try:
        found = models.resolve_import_path(path)
    except ValueError as e:
        raise ConfigError(f"config key '{key}': {e}") from None
    except (Exception, SystemExit) as e:
        message = " ".join(str(e).split())
        raise ConfigError(
            f"config key '{key}': cannot import {path!r} ({type(e).__name__}: {message})"
        ) from None
    if not callable(found):
        raise ConfigError(f"config key '{key}': {path!r} is not a function")
    return found


def _group_names(config: ml_collections.ConfigDict) -> list[str]:
    """Model names of the architecture groups (``[model.student]`` if none are set)."""
    names = [n.strip() for n in config.model.student_groups.split(",") if n.strip()]
    return names or [config.model.student]


#: What a user's dataset loader (``data.name=package.module:function``) may return
#: as a dict: the arrays of :func:`fedjax_kd.data.from_arrays`.
_USER_DATASET_KEYS = ("x_train", "y_train", "x_test", "y_test")
_USER_DATASET_OPTIONAL = ("num_classes", "client_indices", "compact", "accuracy_ignore")


def _user_dataset(config: ml_collections.ConfigDict, partition_kwargs: dict) -> FederatedDataset:
    """Calls a user's loader and partitions its arrays as ``config.data`` says.

    The loader is called as ``load(seed=...)`` when it takes ``seed``, else
    ``load()``; it returns a :class:`FederatedDataset` (used as it is) or a
    dict with ``x_train, y_train, x_test, y_test`` (and optionally
    ``num_classes``, ``client_indices`` -- one index array per client --,
    ``compact`` and ``accuracy_ignore``, as for ``data.from_arrays``: a
    next-token task passes ``compact=True`` to keep int32 tokens), which
    ``data.partition`` splits over ``data.num_clients``.
    """
    import inspect

    d = config.data
    load = models.resolve_import_path(d.name)
    try:
        params = inspect.signature(load).parameters.values()
        takes_seed = any(p.name == "seed" or p.kind is p.VAR_KEYWORD for p in params)
    except (TypeError, ValueError):
        takes_seed = False
    try:
        loaded = load(seed=config.seed) if takes_seed else load()
    except Exception as e:
        raise ConfigError(
            f"config key 'data.name': {d.name} raised {type(e).__name__}: {e}"
        ) from None
    if isinstance(loaded, FederatedDataset):
        return loaded
    if not isinstance(loaded, dict) or not set(_USER_DATASET_KEYS) <= set(loaded):
        raise ConfigError(
            f"config key 'data.name': {d.name} must return a FederatedDataset or a dict with "
            f"{', '.join(_USER_DATASET_KEYS)}; got {type(loaded).__name__}"
        )
    unknown = sorted(set(loaded) - set(_USER_DATASET_KEYS) - set(_USER_DATASET_OPTIONAL))
    if unknown:
        raise ConfigError(
            f"config key 'data.name': {d.name} returned unknown keys {unknown}; a loader's "
            f"dict may hold {', '.join(_USER_DATASET_KEYS + _USER_DATASET_OPTIONAL)}"
        )
    given = loaded.get("client_indices")
    try:
        return data_lib.from_arrays(
            *(loaded[k] for k in _USER_DATASET_KEYS),
            name=d.name,
            num_classes=loaded.get("num_classes"),
            num_clients=None if given is not None else d.num_clients,
            partition=d.partition,
            seed=config.seed,
            proxy_fraction=d.proxy_fraction,
            client_indices=given,
            compact=bool(loaded.get("compact", False)),
            accuracy_ignore=loaded.get("accuracy_ignore", ()),
            **({} if given is not None else partition_kwargs),
        )
    except ValueError as e:
        raise ConfigError(f"data ({d.name}, partition={d.partition}): {e}") from None


def build_dataset(config: ml_collections.ConfigDict) -> FederatedDataset:
    """Builds the federated dataset ``config.data.name`` names, through its spec (or a loader)."""
    d = config.data
    spec = None if models.is_import_path(d.name) else DATASET_SPECS[d.name]
    hp = dict(config[spec.name]) if spec is not None and spec.hypers else {}
    partition = hp[spec.partition_option] if spec and spec.partition_option else d.partition
    kwargs = {}
    if partition in ("dirichlet", "quantity"):
        kwargs["min_size"] = d.min_client_size
    if partition == "dirichlet":
        kwargs["alpha"] = d.alpha
    elif partition == "shards":
        kwargs["shards_per_client"] = d.shards_per_client
    elif partition == "quantity":
        kwargs["sigma"] = d.quantity_sigma
    if spec is None:
        return _user_dataset(config, kwargs)
    ctx = DataContext(
        hp=hp,
        num_clients=d.num_clients,
        partition=partition,
        partition_kwargs=kwargs,
        seed=config.seed,
        proxy_fraction=d.proxy_fraction,
        data_dir=d.dir,
    )
    try:
        return spec.build(ctx)
    except (MissingFile, CorruptFile) as e:
        raise ConfigError(f"data ({d.name}): {e}") from None
    except ValueError as e:
        keys = ["data.num_clients", "data.min_client_size", "data.proxy_fraction"]
        keys += [f"{spec.name}.{h}" for h in spec.hypers if h != spec.partition_option]
        raise ConfigError(
            f"data ({d.name}, partition={partition}): {e} (check {', '.join(keys)})"
        ) from None


def _build_model(config: ml_collections.ConfigDict, dataset: FederatedDataset, role: str):
    """Builds ``config.model.<role>`` (``student`` or ``teacher``) for ``dataset``."""
    return _create_model(config.model[role], dataset, f"model.{role}")


def _check_inputs(name: str, dataset: FederatedDataset, key: str) -> None:
    """ConfigError when a built-in model cannot take the dataset's inputs (tokens vs features)."""
    try:
        spec, _ = models.parse_name(name)
    except ValueError:
        return  # create() names the bad model
    tokens = np.dtype(dataset.train.x.dtype) == np.int32
    if tokens and spec.inputs != "tokens":
        takes = [s.example for s in models.MODEL_SPECS.values() if s.inputs == "tokens"]
        raise ConfigError(
            f"config key '{key}': {name} takes features, and {dataset.name} holds int32 "
            f"token ids; use a sequence model ({', '.join(takes)})"
        )
    if spec.inputs == "tokens" and not tokens:
        raise ConfigError(
            f"config key '{key}': {name} takes int32 token ids, and {dataset.name} holds "
            f"{dataset.train.x.dtype} features (token datasets: shakespeare, stackoverflow)"
        )


def _check_vocabulary(names: list[tuple[str, str]], dataset: FederatedDataset) -> None:
    """ConfigError when token ids leave the token models' vocabulary (the classes).

    ``names`` holds the run's ``(config key, model name)`` pairs; the token
    range is read once (a pass over the population), for the first token
    model only (every built-in token model's vocabulary is the classes).
    """
    for key, name in names:
        if models.is_import_path(name) or models.parse_name(name)[0].inputs != "tokens":
            continue
        arrays = [dataset.train.x, dataset.test_x, dataset.proxy_x]
        arrays = [np.asarray(a) for a in arrays if a is not None and np.size(a)]
        largest = max((int(a.max()) for a in arrays), default=0)
        smallest = min((int(a.min()) for a in arrays), default=0)
        if smallest < 0 or largest >= dataset.num_classes:
            raise ConfigError(
                f"config key '{key}': {name}'s vocabulary is the {dataset.num_classes} "
                f"classes (next-token tasks), and {dataset.name}'s token ids lie in "
                f"[{smallest}, {largest}]"
            )
        return


def _create_model(name: str, dataset: FederatedDataset, key: str):
    """A built-in model by name, or a user's by import path (``models.from_import_path``)."""
    user = models.is_import_path(name)
    shapes = dict(feature_shape=dataset.feature_shape, num_classes=dataset.num_classes)
    if not user:
        _check_inputs(name, dataset, key)
        make = functools.partial(models.create, per_position=bool(dataset.target_shape))
    else:
        make = models.from_import_path
    try:
        model = make(name, **shapes)
    except ValueError as e:
        raise ConfigError(f"config key '{key}': {e}") from None
    except Exception as e:  # a user's model function failed: say so in one line
        if not user:
            raise
        raise ConfigError(f"config key '{key}': {name} raised {type(e).__name__}: {e}") from None
    if dataset.target_shape:
        _check_per_position(model, dataset, key)
    return model


def _check_per_position(model, dataset: FederatedDataset, key: str) -> None:
    """ConfigError unless a model gives ``[B, T, C]`` logits for per-position targets.

    A user's model may not predict per position; a built-in sequence model
    does, but over the inputs' length, which must be the targets'.
    """
    x = jax.ShapeDtypeStruct((2, *dataset.feature_shape), dataset.train.x.dtype)
    try:
        params = jax.eval_shape(model.init, jax.random.key(0))
        out = jax.eval_shape(model.apply, params, x).shape
    except Exception as e:
        raise ConfigError(
            f"config key '{key}': {model.name} raised {type(e).__name__}: {e}"
        ) from None
    want = (2, *dataset.target_shape, dataset.num_classes)
    if tuple(out) != want:
        raise ConfigError(
            f"config key '{key}': {model.name} gives logits of shape {tuple(out)} for 2 "
            f"examples; {dataset.name}'s targets are per position, so it must give {want}"
        )


def build_algorithm(
    config: ml_collections.ConfigDict, dataset: FederatedDataset
) -> FederatedAlgorithm:
    """Builds the algorithm ``config.algorithm.name`` names, through its spec.

    The context holds what every spec may use (models, optimizers, the FedAvg
    and personal families' arguments, stragglers, server distillation); the
    spec's ``build`` picks its arguments. A builder's ValueError becomes a
    ConfigError naming the hyperparameter's key when the message names one.
    """
    spec = _algorithm_spec(config)
    if spec.needs_proxy(config) and dataset.proxy_x is None:
        raise ConfigError(
            f"algorithm '{spec.name}' distils on a server proxy set, and the dataset "
            f"{config.data.name!r} has none (its loader returned no proxy_x)"
        )
    c, s = config.client, config.server
    student = _build_model(config, dataset, "student")
    run_models = [("model.student", config.model.student)]
    if spec.teacher:
        run_models.append(("model.teacher", config.model.teacher))
    if spec.groups:
        run_models += [("model.student_groups", n) for n in _group_names(config)]
    client_optimizer = optimizers.client_optimizer(c.optimizer, lr=c.lr, momentum=c.momentum)
    ctx = BuildContext(
        hp=dict(config[spec.name]) if spec.hypers else {},
        config=config,
        dataset=dataset,
        student=student,
        teacher=_build_model(config, dataset, "teacher") if spec.teacher else None,
        group_models=(
            [_create_model(n, dataset, "model.student_groups") for n in _group_names(config)]
            if spec.groups
            else [student]
        ),
        common=dict(
            client_optimizer=client_optimizer,
            server_optimizer=optimizers.server_optimizer(
                s.optimizer, lr=s.lr, momentum=s.momentum, b1=s.b1, b2=s.b2, eps=s.eps
            ),
            epochs=c.epochs,
            batch_size=c.batch_size,
            uniform_weighting=config.algorithm.uniform_weighting,
        ),
        personal=dict(
            num_clients=dataset.num_clients,
            client_optimizer=client_optimizer,
            epochs=c.epochs,
            batch_size=c.batch_size,
        ),
        stragglers=dict(straggler_fraction=c.straggler_fraction, drop_stragglers=c.drop_stragglers),
        distill=dict(
            distill_optimizer=optax.chain(optax.clip_by_global_norm(5.0), optax.adam(s.distill_lr)),
            distill_steps=s.distill_steps,
            distill_batch_size=s.distill_batch_size,
        ),
        robust=_robust_arguments(config, dataset)
        if spec.robust
        else _dp_arguments(config, dataset)
        if spec.private_outputs or spec.private_updates
        else {},
    )
    _check_vocabulary(run_models, dataset)
    try:
        algorithm = spec.build(ctx)
        dp = ctx.robust.get("dp") or ctx.robust.get("output_dp")
        if dp is not None:
            metrics = privacy.host_metrics(
                dp, dataset.num_clients, config.clients_per_round, **dp_accounting(config)
            )
            algorithm = algorithm._replace(host_metrics=metrics)
        return algorithm
    except ValueError as e:
        keys = [f"{spec.name}.{h}" for h in spec.hypers if h in str(e)]
        where = f"config key '{keys[0]}'" if keys else f"algorithm '{spec.name}'"
        raise ConfigError(f"{where}: {e}") from None


def _check_memory(
    config: ml_collections.ConfigDict,
    dataset: FederatedDataset,
    algorithm: FederatedAlgorithm,
    parallel: int = 1,
) -> resources.Estimate:
    """Refuses a run whose memory would not fit the machine, before anything compiles.

    The estimate comes from shapes alone (:func:`fedjax_kd.resources.estimate`:
    ``jax.eval_shape``, nothing allocated): the algorithm's state, the data,
    one chunk of the padded cohort and its clients' parameters and gradients,
    a lower bound. It is compared with :func:`fedjax_kd.resources.available_memory`;
    a parallel group of ``parallel`` runs holds ``parallel`` copies of all of it.

    Returns:
      The estimate (of one run), when the run fits (or when the free memory cannot be read).

    Raises:
      ConfigError: one line with the estimated and the available bytes.
    """
    c = config
    client_models = [_create_model(n, dataset, "model.student") for n in _group_names(c)]
    options = _robust_arguments(c, dataset)
    need = resources.estimate(
        algorithm,
        dataset,
        client_models=client_models,
        # A Poisson cohort is padded to its static maximum: that many clients train.
        clients_per_round=options["poisson"].max_cohort
        if options.get("poisson")
        else c.clients_per_round,
        client_chunk_size=c.client_chunk_size or None,
        max_local_examples=c.client.max_examples or None,
        epochs=c.client.epochs,
        init_key=simulate.seed_keys(c.seed)[0],
        stacked_updates=robust.keeps_updates(options["aggregator"], options["attack"]),
    )
    free, where = resources.available_memory()
    if free is not None and parallel > 1 and need.total * parallel > free:
        b = resources.format_bytes
        raise ConfigError(
            f"--parallel: {parallel} runs in one program need at least "
            f"{b(need.total * parallel)} of memory ({b(need.total)} each), more than the "
            f"{b(free)} {where}; use --parallel {max(1, free // max(need.total, 1))} or less"
        )
    if free is not None and need.total > free:
        b = resources.format_bytes
        chunk = min(c.client_chunk_size or c.clients_per_round, c.clients_per_round)
        model = c.model.student_groups or c.model.student
        raise ConfigError(
            f"the run needs at least {b(need.total)} of memory, more than the {b(free)} "
            f"{where} (model {model}: {need.params:,} params; algorithm state "
            f"{b(need.state)}, data {b(need.data)}, cohort chunk {b(need.cohort)}, "
            f"{chunk} clients training {b(need.clients)}, their schedule of "
            f"{c.client.epochs} epochs {b(need.schedule)}"
            + (
                f", the round's {c.clients_per_round} updates {b(need.stacked)}"
                if need.stacked
                else ""
            )
            + "); use a smaller model, fewer "
            "epochs or fewer clients at once (clients_per_round, client_chunk_size, "
            "client.max_examples)"
        )
    return need


def _codec_key(c: ml_collections.ConfigDict) -> str | None:
    """The config key of the uplink codec that is on (the first, if several), or None."""
    for key in ("quantize_bits", "topk_fraction", "svd_energy"):
        if c.client[key]:
            return f"client.{key}"
    return None


def _publishes_outputs(config: ml_collections.ConfigDict, spec) -> bool:
    """Whether this run's clients publish outputs to distil (``dp.output_clip_norm``'s).

    The output-exchanging algorithms (FedMD, DS-FL, FD) always do; those that
    also send updates (teacher_student, FedDF) only when they distil on the
    server (their ``needs_proxy``).
    """
    if not spec.private_outputs:
        return False
    return not spec.private_updates or spec.needs_proxy(config)


def _check_dp(c: ml_collections.ConfigDict, spec) -> None:
    """DP's settings that cannot work together, each refused in one line (ConfigError)."""
    d, name = c.dp, spec.name
    on = d.clip_norm > 0 or d.output_clip_norm > 0
    if d.epsilon_budget > 0 and not on:
        raise ConfigError(
            "config key 'dp.epsilon_budget': a budget needs DP (set dp.clip_norm > 0)"
        )
    if d.output_clip_norm > 0 and not _publishes_outputs(c, spec):
        with_outputs = [s.name for s in algorithms.SPECS.values() if s.private_outputs]
        raise ConfigError(
            f"config key 'dp.output_clip_norm': algorithm '{name}' publishes no outputs for "
            f"distillation in this run; it works with {', '.join(with_outputs)} (teacher_student "
            "and feddf with server.distill_steps > 0)"
        )
    if (
        spec.private_updates
        and _publishes_outputs(c, spec)
        and (d.clip_norm > 0) != (d.output_clip_norm > 0)
    ):
        raise ConfigError(
            f"config key 'dp.{'output_clip_norm' if d.clip_norm > 0 else 'clip_norm'}': "
            f"algorithm '{name}' releases both model updates and proxy logits every round; "
            "set dp.clip_norm and dp.output_clip_norm together, or the epsilon would not "
            "cover one of them"
        )
    if d.adaptive and d.clip_norm <= 0:
        raise ConfigError(
            "config key 'dp.adaptive': adaptive clipping needs DP-FedAvg (set dp.clip_norm > 0, "
            "the initial clip norm)"
        )
    if d.adaptive and not spec.robust:
        raise ConfigError(
            f"config key 'dp.adaptive': adaptive clipping works with "
            f"{', '.join(s.name for s in algorithms.SPECS.values() if s.robust)}, "
            f"not algorithm '{name}'"
        )
    if d.sampling != "fixed" and not on:
        raise ConfigError(
            "config key 'dp.sampling': Poisson sampling is DP-FedAvg's (set dp.clip_norm > 0)"
        )
    if d.sampling == "poisson" and c.client.straggler_fraction > 0:
        raise ConfigError(
            "config key 'dp.sampling': stragglers are drawn from a fixed-size cohort; "
            "Poisson sampling takes no client.straggler_fraction"
        )
    if d.max_cohort and d.sampling != "poisson":
        raise ConfigError(
            "config key 'dp.max_cohort': it pads Poisson cohorts (dp.sampling=poisson)"
        )
    if d.accountant == "pld" and d.sampling != "poisson":
        raise ConfigError(
            "config key 'dp.accountant': pld cannot account fixed-size sampling without "
            "replacement (dp-accounting's PLD does not support it); use dp.sampling=poisson "
            "or dp.accountant=rdp"
        )
    if on and spec.groups and len(_group_names(c)) > 1:
        raise ConfigError(
            "config key 'dp.clip_norm': DP is accounted for uniform sampling; architecture "
            "groups sample each group apart (use one model group)"
        )


def dp_accounting(config: ml_collections.ConfigDict) -> dict:
    """:func:`fedjax_kd.privacy.epsilon`'s ``sampling``, ``accountant`` and ``releases``.

    ``releases``: one Gaussian release per round for the updates
    (``dp.clip_norm``) and one for the published outputs
    (``dp.output_clip_norm``).
    """
    d = config.dp
    releases = int(d.clip_norm > 0) + int(d.output_clip_norm > 0)
    return dict(sampling=d.sampling, accountant=d.accountant, releases=max(releases, 1))


def _dp_arguments(config: ml_collections.ConfigDict, dataset: FederatedDataset) -> dict:
    """``dp``, ``output_dp`` and ``poisson`` of ``dp.*`` (None: off)."""
    d, k, n = config.dp, config.clients_per_round, dataset.num_clients
    out = {"dp": None}
    if d.clip_norm > 0:
        adaptive = None
        if d.adaptive:
            adaptive = privacy.AdaptiveClip(
                d.target_quantile, d.clip_learning_rate, d.count_stddev or k / 20
            )
        out["dp"] = privacy.DP(d.clip_norm, d.noise_multiplier, d.delta, adaptive)
    if d.output_clip_norm > 0:
        out["output_dp"] = privacy.DP(d.output_clip_norm, d.noise_multiplier, d.delta)
    if d.sampling == "poisson":
        rate = k / n
        least = privacy.max_cohort_size(n, rate, config.rounds)
        if d.max_cohort and not least <= d.max_cohort <= n:
            raise ConfigError(
                f"config key 'dp.max_cohort': {d.max_cohort} must be in [{least}, {n}]: below "
                f"{least}, a Poisson draw at rate {rate:.3g} overflows it with probability "
                f"> 1e-6 over the {config.rounds} rounds (an overflowing round is not the "
                "accounted mechanism); above the population it pads for nothing; 0 = automatic"
            )
        out["poisson"] = privacy.Poisson(rate, d.max_cohort or least, float(k))
    return out


def _robust_arguments(config: ml_collections.ConfigDict, dataset: FederatedDataset) -> dict:
    """``aggregator`` and ``attack`` of ``server.aggregator`` and ``attack.*`` (None: default)."""
    s, a = config.server, config.attack
    aggregator = None
    if s.aggregator != "mean":
        aggregator = robust.make_aggregator(
            s.aggregator,
            trim_beta=s.trim_beta,
            krum_f=s.krum_f,
            multi_krum_m=s.multi_krum_m,
            norm_bound=s.norm_bound,
            clip_tau=s.clip_tau,
            clip_iters=s.clip_iters,
        )
    attack = None
    if a.kind != "none" and a.fraction > 0:
        attack = robust.Attack(
            kind=a.kind,
            fraction=a.fraction,
            scale=a.scale,
            noise_std=a.noise_std,
            epsilon=a.epsilon,
            num_classes=dataset.num_classes,
        )
    out = {"aggregator": aggregator, "attack": attack, **_dp_arguments(config, dataset)}
    if s.drop_nonfinite:
        out["drop_nonfinite"] = True
    for key in ("quantize_bits", "topk_fraction", "svd_energy"):
        if config.client[key]:
            out[key] = config.client[key]
    if config.client.error_feedback:
        out.update(error_feedback=True, num_clients=dataset.num_clients)
    return out


#: Config keys a checkpointed run may change when it resumes: its length (a larger
#: ``rounds`` extends a finished run) and its checkpoint cadence.
RESUMABLE_KEYS = ("rounds", "checkpoint_every")


def config_conflicts(workdir: str | os.PathLike, config: ml_collections.ConfigDict):
    """How ``workdir/config.json`` differs from ``config`` beyond what a resume may change.

    Returns:
      ``["key old -> new", ...]`` (empty when compatible), or None when the
      workdir has no ``config.json``. A key missing from an older
      ``config.json`` counts as its default; :data:`RESUMABLE_KEYS` may differ
      (``rounds`` not for algorithms whose spec is ``rounds_dependent``).

    Raises:
      ValueError: ``config.json`` is unreadable or not a JSON object.
    """
    path = Path(workdir) / "config.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(str(e.strerror or e)) from None
    if not isinstance(old, dict):
        raise ValueError("not a JSON object")
    spec = _algorithm_spec(config)
    before, defaults = flatten(old), _flatten(default_config.get_config())
    defaults.update({f"{spec.name}.{k}": v for k, v in spec.defaults().items()})
    resumable = set(RESUMABLE_KEYS)
    if spec.rounds_dependent(config):
        resumable.discard("rounds")  # its schedule spans config.rounds
    return [
        f"{key} {before.get(key, defaults[key])!r} -> {value!r}"
        for key, value in _flatten(config).items()
        if key not in resumable and before.get(key, defaults[key]) != value
    ]


def _check_same_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """ConfigError if ``workdir/config.json`` differs from ``config`` beyond RESUMABLE_KEYS."""
    hint = "pass --resume to continue its checkpoint anyway or --overwrite to start from scratch"
    try:
        diffs = config_conflicts(workdir, config)
    except ValueError as e:
        raise ConfigError(f"--workdir {workdir}: cannot read config.json ({e}); {hint}") from None
    if diffs:
        shown = ", ".join(diffs[:4]) + (f", ... ({len(diffs)} keys)" if len(diffs) > 4 else "")
        raise ConfigError(
            f"--workdir {workdir} holds a checkpointed run with a different config ({shown}); "
            + hint
        )


def run(
    config: ml_collections.ConfigDict | None = None,
    *,
    workdir: str | os.PathLike | None = None,
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
) -> simulate.RunResult:
    """Runs the experiment described by ``config`` (default: the embedded default).

    With a ``workdir``, writes ``config.json`` at the start, one line of
    ``metrics.jsonl`` per evaluation as it happens, ``summary.json`` at the
    end, and checkpoints into ``workdir/checkpoints/`` every
    ``config.checkpoint_every`` rounds (0: at every evaluation) and after the
    last round (:mod:`fedjax_kd.checkpoint`; the newest 3 are kept).

    Running again with the same ``workdir`` resumes from the newest intact
    checkpoint (``resuming from round N`` on stderr; a corrupt one is skipped
    with a warning): ``metrics.jsonl`` is cut back to that round and appended
    to, and the results equal an uninterrupted run bit for bit. A larger
    ``rounds`` extends a finished run. A workdir without a checkpoint starts
    from scratch.

    Args:
      config: the experiment config (resolved and validated here).
      workdir: output directory (None: write nothing).
      progress: show a progress bar on stderr.
      overwrite: start from scratch, deleting the workdir's checkpoints and metrics.
      resume: resume even when the workdir's ``config.json`` differs from
        ``config`` in keys other than ``rounds`` and ``checkpoint_every``
        (without it, such a difference is a ConfigError naming the keys).

    Example::

      from fedjax_kd import experiment
      cfg = experiment.resolve(overrides=[("rounds", "20")])
      result = experiment.run(cfg, progress=False)
      print(result.summary["test_accuracy"])
    """
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume exclude each other; pass one of them")
    if (overwrite or resume) and workdir is None:
        flag = "--overwrite" if overwrite else "--resume"
        raise ConfigError(f"{flag} needs --workdir (the run to overwrite or resume)")
    if workdir is not None and not os.fspath(workdir).strip():
        raise ConfigError("--workdir: the path is empty; give a directory (or leave it out)")
    config = resolve(config)
    dataset, algorithm = build_run(config)
    if workdir is not None and jax.process_index() != 0:
        workdir = None  # multi-host: process 0 writes the files
    if workdir is None:
        return _simulate(config, dataset, algorithm, progress=progress)
    try:
        with workdir_lib.hold(workdir):
            return _run_in_workdir(
                Path(workdir), config, dataset, algorithm, progress, overwrite, resume
            )
    except workdir_lib.WorkdirError as e:
        raise ConfigError(str(e)) from None


def _count_params(name: str, dataset: FederatedDataset, key: str) -> int:
    """The number of parameters of model ``name`` on ``dataset`` (shapes only, no init)."""
    model = _create_model(name, dataset, key)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def describe_run(config: ml_collections.ConfigDict, dataset: FederatedDataset) -> str:
    """The start-up line of a run: the data, its memory per example, the models' sizes.

    E.g. ``data: mnist1d, 100 clients, 3,600 train / 1,000 test examples of
    (40,) float32 (164 B each with its label); model: cnn1d-25-25-25 (5,210
    params)``; with a teacher (``AlgorithmSpec.teacher``) its size too.
    """
    x = dataset.train.x
    labels = math.prod(dataset.target_shape)  # 1, or T per-position targets
    per_example = math.prod(dataset.feature_shape) * np.dtype(x.dtype).itemsize + 4 * labels
    count = int(np.sum(np.asarray(dataset.train.count)))
    test_clients = (
        int(np.count_nonzero(np.bincount(dataset.test_client)))
        if simulate.num_test_clients(dataset)
        else 0
    )
    line = (
        f"data: {dataset.name}, {dataset.num_clients:,} clients, {count:,} train / "
        f"{len(dataset.test_y):,} test examples"
        + (f" ({test_clients:,} test clients)" if test_clients else "")
        + f" of {tuple(dataset.feature_shape)} {np.dtype(x.dtype).name}"
        + (f" with {labels} targets each" if dataset.target_shape else "")
        + f" ({per_example:,} B each with its label{'s' * bool(dataset.target_shape)})"
    )
    student = config.model.student
    line += f"; model: {student} ({_count_params(student, dataset, 'model.student'):,} params"
    if _algorithm_spec(config).teacher:
        teacher = config.model.teacher
        n = _count_params(teacher, dataset, "model.teacher")
        line += f"; teacher {teacher}: {n:,} params"
    return line + ")"


def build_run(config: ml_collections.ConfigDict, parallel: int = 1):
    """The dataset and algorithm of the resolved ``config``, checked to fit.

    Refuses (ConfigError) a cohort larger than the dataset or its model
    groups, and a run whose memory estimate exceeds the machine's
    (``parallel`` copies of it for a parallel group, :mod:`fedjax_kd.parallel`),
    before anything compiles or a workdir is touched.

    Returns:
      ``(dataset, algorithm)``.
    """
    dataset = build_checked_dataset(config)
    algorithm = build_algorithm(config, dataset)
    _check_memory(config, dataset, algorithm, parallel)
    return dataset, algorithm


def _all_finite(a) -> bool:
    """Whether a float array holds no NaN or Inf (block by block: no full-size mask)."""
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating) or a.size == 0:
        return True
    flat = a.reshape(len(a), -1) if a.ndim > 1 else a.reshape(-1, 1)
    step = max(1, (1 << 24) // max(flat.shape[1], 1))
    return all(np.isfinite(flat[i : i + step]).all() for i in range(0, len(flat), step))


def check_data_values(dataset: FederatedDataset, name: str | None = None) -> None:
    """ConfigError naming the dataset when its values cannot be trained on.

    NaN or Inf in the training, test or proxy features; labels outside
    ``[0, num_classes)`` (``-1`` allowed for per-position targets); a
    population whose clients hold no example at all. Runs on the host
    before anything compiles. ``name``: how the error names the data
    (default ``dataset.name``; the run passes ``data.name``).
    """
    name = dataset.name if name is None else name
    for what, array in (
        ("training features", dataset.train.x),
        ("test features", dataset.test_x),
        ("proxy features", dataset.proxy_x),
    ):
        if array is not None and not _all_finite(array):
            raise ConfigError(
                f"data ({name}): its {what} hold NaN or Inf; clean or impute them first"
            )
    lowest = -1 if dataset.target_shape else 0
    for what, y in (("training", dataset.train.y), ("test", dataset.test_y)):
        y = np.asarray(y)
        if y.size and (y.min() < lowest or y.max() >= dataset.num_classes):
            raise ConfigError(
                f"data ({name}): its {what} labels lie in [{y.min()}, {y.max()}], outside "
                f"[{lowest}, {dataset.num_classes}) (num_classes {dataset.num_classes})"
            )
    if int(np.sum(np.asarray(dataset.train.count))) == 0:
        raise ConfigError(f"data ({name}): every client is empty (no training example)")


def build_checked_dataset(config: ml_collections.ConfigDict) -> FederatedDataset:
    """:func:`build_dataset`, refusing a cohort larger than the dataset or its model groups,
    and data it cannot train on (:func:`check_data_values`)."""
    dataset = build_dataset(config)
    check_data_values(dataset, config.data.name)
    if config.client.augment != "none" and len(dataset.feature_shape) not in (2, 3):
        raise ConfigError(
            f"config key 'client.augment': {config.client.augment} needs images "
            f"[H, W(, C)], and {dataset.name}'s examples have shape {dataset.feature_shape}"
        )
    if dataset.proxy_x is not None and not len(dataset.proxy_x):
        raise ConfigError(
            f"config key 'data.proxy_fraction': {config.data.proxy_fraction} of "
            f"{dataset.name}'s training data is not one example; raise it"
        )
    if config.clients_per_round > dataset.num_clients:
        raise ConfigError(
            f"config key 'clients_per_round' must be <= the dataset's {dataset.num_clients} "
            f"clients, got {config.clients_per_round}"
        )
    groups = len(_group_names(config))
    if groups > 1 and min(cohort.group_sizes(dataset.num_clients, groups)) < (
        config.clients_per_round // groups
    ):
        raise ConfigError(
            f"config key 'clients_per_round': each of the {groups} model groups needs "
            f"{config.clients_per_round // groups} clients of the {dataset.num_clients}"
        )
    return dataset


def dp_rounds(config: ml_collections.ConfigDict, dataset: FederatedDataset | None) -> int:
    """The rounds a run makes: ``rounds``, or fewer where ``dp.epsilon_budget`` ends it.

    With DP and a budget, the last round whose epsilon (at ``dp.delta``) stays
    within the budget; the start-up prints the cut. ConfigError when not even
    one round fits.
    """
    d = config.dp
    on = d.clip_norm > 0 or d.output_clip_norm > 0
    if dataset is None or not on or d.epsilon_budget <= 0:
        return config.rounds
    accounting = dp_accounting(config)
    allowed = privacy.rounds_within(
        d.epsilon_budget,
        dataset.num_clients,
        config.clients_per_round,
        d.noise_multiplier,
        d.delta,
        max_rounds=config.rounds,
        **accounting,
    )
    if allowed == 0:
        eps = privacy.epsilon(
            dataset.num_clients,
            config.clients_per_round,
            d.noise_multiplier,
            1,
            d.delta,
            **accounting,
        )
        raise ConfigError(
            f"config key 'dp.epsilon_budget': {d.epsilon_budget} is below one round's epsilon "
            f"{eps:.3g} (at delta {d.delta}); raise it or dp.noise_multiplier"
        )
    return min(config.rounds, allowed)


def run_settings(config: ml_collections.ConfigDict, dataset=None) -> dict:
    """The keyword arguments of ``simulate.run`` that ``config`` sets (all but the seed).

    With ``dataset`` and DP's ``dp.epsilon_budget`` the rounds stop at the
    budget (:func:`dp_rounds`).
    """
    rounds = dp_rounds(config, dataset)
    d = config.dp
    if dataset is not None and (d.clip_norm > 0 or d.output_clip_norm > 0):
        k, n = config.clients_per_round, dataset.num_clients
        drawn = (
            f"each of the {n} clients joins with probability {k / n:.3g} (Poisson)"
            if d.sampling == "poisson"
            else f"{k} of {n} clients without replacement"
        )
        relation = "replace-one" if d.sampling == "fixed" else "add/remove-one"
        print(
            f"dp: epsilon by {d.accountant.upper()} at delta {d.delta}: {drawn} a round, "
            f"{relation} neighbours, {dp_accounting(config)['releases']} Gaussian release(s) "
            f"of noise multiplier {d.noise_multiplier} a round",
            file=sys.stderr,
            flush=True,
        )
    if rounds < config.rounds:
        print(
            f"dp: epsilon budget {config.dp.epsilon_budget} reached after {rounds} of the "
            f"{config.rounds} rounds; the run stops there",
            file=sys.stderr,
            flush=True,
        )
    return dict(
        rounds=rounds,
        clients_per_round=config.clients_per_round,
        eval_every=config.eval_every,
        eval_batch_size=config.eval_batch_size,
        max_local_examples=config.client.max_examples or None,
        client_chunk_size=config.client_chunk_size or None,
        rounds_per_call=config.rounds_per_call,
        checkpoint_every=config.checkpoint_every,
        name=_algorithm_spec(config).name,  # in the "compiling NAME round ..." line
        augment=augment.make_augment(config.client.augment, config.client.crop_padding),
    )


def _simulate(config, dataset, algorithm, *, progress, **callbacks) -> simulate.RunResult:
    """``simulate.run`` with the run settings of ``config`` (after the start-up line)."""
    if progress and jax.process_index() == 0:
        print(describe_run(config, dataset), file=sys.stderr, flush=True)
    return simulate.run(
        algorithm,
        dataset,
        seed=config.seed,
        progress=progress,
        **run_settings(config, dataset),
        **callbacks,
    )


def _run_in_workdir(workdir: Path, config, dataset, algorithm, progress, overwrite, resume):
    """The run of :func:`run` in a held workdir: restore or start, write as it goes."""
    opened = open_workdir(
        workdir,
        config,
        algorithm,
        overwrite=overwrite,
        resume=resume,
        rounds=dp_rounds(config, dataset),
    )
    result = _simulate(
        config,
        dataset,
        algorithm,
        progress=progress,
        on_eval=opened.on_eval,
        on_checkpoint=opened.on_checkpoint,
        resume=opened.restored,
    )
    opened.finish(result)
    return result


class OpenWorkdir(NamedTuple):
    """A run's workdir, made ready by :func:`open_workdir` (a held workdir).

    Attributes:
      restored: the checkpoint to resume from, or None to start afresh.
      on_eval: appends an evaluation record to ``metrics.jsonl``.
      on_checkpoint: saves a checkpoint with the records so far (None when
        the run keeps none: multi-host).
      finish: ``finish(result)`` writes ``summary.json``.
    """

    restored: Any
    on_eval: Any
    on_checkpoint: Any
    finish: Any


def open_workdir(
    workdir: Path,
    config,
    algorithm,
    *,
    overwrite: bool = False,
    resume: bool = False,
    rounds: int | None = None,
) -> OpenWorkdir:
    """Restores or starts the run of ``config`` in the held ``workdir`` (:func:`run`'s files).

    Nothing a finished run wrote is removed before something replaces it:
    ``summary.json`` stays until the new one is written (atomically), and on
    resume ``metrics.jsonl`` is checked against the records the checkpoint
    kept (:func:`fedjax_kd.workdir.reconcile_metrics`). An OS error while
    writing (a full disk) is a :class:`~fedjax_kd.workdir.WorkdirError`
    naming the file; the checkpoints and metrics written before stay, so the
    same command resumes. ``rounds``: the rounds the run makes when fewer
    than ``config.rounds`` (DP's epsilon budget, :func:`dp_rounds`).
    """
    rounds = config.rounds if rounds is None else rounds
    checkpoints: Path | None = workdir / "checkpoints"
    metrics_path = workdir / "metrics.jsonl"
    restored, repaired = None, ""
    evaluated = lambda r: r % config.eval_every == 0 or r == rounds  # noqa: E731
    try:
        if jax.process_count() > 1:
            # Every process would have to restore the same checkpoint; not supported.
            print(
                "warning: no checkpoints in multi-host runs; a rerun starts from scratch",
                file=sys.stderr,
            )
            checkpoints = None
        elif not overwrite and checkpoint.rounds(checkpoints):
            if not resume:
                _check_same_config(workdir, config)
            template = jax.eval_shape(algorithm.init, simulate.seed_keys(config.seed)[0])
            restored = checkpoint.latest_valid(checkpoints, template)
            if restored is None:
                # Never delete a run's checkpoints on a guess (e.g. --resume with
                # another model: none fits); the user decides.
                raise ConfigError(
                    f"--workdir {workdir}: no checkpoint in {checkpoints} can be restored "
                    "into this config's state (corrupt, or another model/algorithm); "
                    "pass --overwrite to start from scratch"
                )
            if restored.round > rounds:
                where = (
                    f"config.rounds={config.rounds}"
                    if rounds == config.rounds
                    else f"the {rounds} rounds within dp.epsilon_budget={config.dp.epsilon_budget}"
                )
                raise ConfigError(
                    f"--workdir {workdir} has a checkpoint after round {restored.round}, "
                    f"past {where}; pass --overwrite to start from scratch"
                )
        elif not overwrite and (metrics_path.is_file() or (workdir / "summary.json").exists()):
            print(f"note: {workdir} has no checkpoint; starting from scratch", file=sys.stderr)
        if checkpoints is not None:
            # Past the one resumed from (or all when starting afresh): corrupt or stale.
            checkpoint.prune(checkpoints, above=restored.round if restored else -1)
        workdir_lib.write_atomic(
            workdir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n"
        )
        if restored is not None:
            kept = restored.extra.get("records")
            records, repaired = workdir_lib.reconcile_metrics(
                metrics_path, kept, restored.round, evaluated
            )
        else:
            # Starting afresh: the old summary and metrics describe no run of this config.
            (workdir / "summary.json").unlink(missing_ok=True)
            workdir_lib.write_atomic(metrics_path, "")
            records = []
    except OSError as e:
        raise workdir_lib.write_error(e.filename or workdir, e) from None
    if restored is not None:
        note = f" ({repaired})" if repaired else ""
        print(f"resuming from round {restored.round}{note}", file=sys.stderr, flush=True)

    def on_eval(record: dict) -> None:
        records.append(record)
        try:
            workdir_lib.append_line(metrics_path, json.dumps(record))
        except OSError as e:
            raise workdir_lib.write_error(metrics_path, e) from None

    on_checkpoint = None
    if checkpoints is not None:

        def on_checkpoint(round_: int, state, extra: dict) -> None:
            # The records up to this round travel with the state, so a resume can
            # repair metrics.jsonl from them.
            kept = [r for r in records if r["round"] <= round_]
            try:
                checkpoint.save(checkpoints, round_, state, {**extra, "records": kept})
            except OSError as e:
                raise workdir_lib.write_error(checkpoint.path_for(checkpoints, round_), e) from None

    def finish(result) -> None:
        summary_path = workdir / "summary.json"
        try:
            workdir_lib.write_atomic(summary_path, json.dumps(result.summary, indent=2) + "\n")
        except OSError as e:
            raise workdir_lib.write_error(summary_path, e) from None

    return OpenWorkdir(restored, on_eval, on_checkpoint, finish)
