"""What algorithms, model families and datasets say about themselves: the specs.

Each algorithm module declares one :class:`AlgorithmSpec` (``SPEC``) next to
its builder: its name, a one-line help, its hyperparameters with defaults and
one-line help (named as in its paper; they live under the config namespace
``<name>.``), what it needs or supports, and ``build(ctx)``, which maps a
:class:`BuildContext` to the builder's arguments. The experiment layer derives
the config schema, validation, error messages, ``fedjax-kd list`` and
building from the specs and never branches on an algorithm's name (principle
9 of ``docs/ARCHITECTURE.md``); a user's algorithm is a spec too
(``--config.algorithm.name=package.module:SPEC``). Model families
(:class:`ModelSpec`, ``fedjax_kd.models.MODEL_SPECS``) and datasets
(:class:`DatasetSpec`, ``fedjax_kd.data.DATASET_SPECS``) describe themselves
the same way.

Light on purpose (standard library only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter of an algorithm: default, help and the allowed values.

    Attributes:
      default: the default value; its type (bool, int, float, str) is the
        config value's type.
      help: one line, e.g. "proximal weight mu of (mu/2)||w - w_global||^2".
      check: optional predicate on the value (e.g. ``lambda v: v >= 0``).
      allowed: how to say what ``check`` allows, for the error (``">= 0"``).
      choices: for a string, the allowed values.
    """

    default: bool | int | float | str
    help: str
    check: Callable[[Any], bool] | None = None
    allowed: str = ""
    choices: tuple[str, ...] = ()

    def error(self, key: str, value) -> str | None:
        """The one-line message for a value it does not allow (None when allowed)."""
        if self.choices and value not in self.choices:
            return f"config key '{key}' must be one of {', '.join(self.choices)}, got {value!r}"
        if self.check is not None and not self.check(value):
            return f"config key '{key}' must be {self.allowed}, got {value!r}"
        return None


def at_least(bound) -> dict:
    """``Hyper`` arguments for ``value >= bound``."""
    return {"check": lambda v: v >= bound, "allowed": f">= {bound}"}


def positive() -> dict:
    """``Hyper`` arguments for ``value > 0``."""
    return {"check": lambda v: v > 0, "allowed": "> 0"}


def fraction() -> dict:
    """``Hyper`` arguments for ``0 < value <= 1``."""
    return {"check": lambda v: 0 < v <= 1, "allowed": "in (0, 1]"}


class BuildContext(NamedTuple):
    """Everything the experiment layer hands a spec's ``build``.

    Attributes:
      hp: the algorithm's hyperparameters (its config namespace) as a dict.
      config: the whole resolved config (read-only by convention).
      dataset: the :class:`~fedjax_kd.data.FederatedDataset`.
      student: the clients' model (``model.student``).
      teacher: ``model.teacher`` when the spec has ``teacher=True``, else None.
      group_models: one model per architecture group (``model.student_groups``,
        or ``[student]``).
      common: ``client_optimizer``, ``server_optimizer``, ``epochs``,
        ``batch_size``, ``uniform_weighting``: the FedAvg family's arguments.
      personal: ``num_clients``, ``client_optimizer``, ``epochs``,
        ``batch_size``: the personal-model family's arguments.
      stragglers: ``straggler_fraction``, ``drop_stragglers``.
      distill: ``distill_optimizer``, ``distill_steps``, ``distill_batch_size``
        (the server's ensemble distillation, ``server.distill_*``).
      robust: ``aggregator`` and ``attack`` (``server.aggregator``,
        ``attack.*``: :mod:`fedjax_kd.robust`), for specs with ``robust=True``;
        for specs with ``private_outputs=True``: ``output_dp`` (a
        :class:`fedjax_kd.privacy.DP` for the published outputs, or None) and
        ``dp`` (the same for model updates, where the algorithm also sends
        them: teacher_student, FedDF).
    """

    hp: dict
    config: Any
    dataset: Any
    student: Any
    teacher: Any
    group_models: list
    common: dict
    personal: dict
    stragglers: dict
    distill: dict
    robust: dict = {}  # noqa: RUF012 (read-only, never mutated)


def _never(config) -> bool:
    return False


def always(config) -> bool:
    """``needs_proxy`` of algorithms that always exchange outputs on the proxy set."""
    return True


def with_server_distillation(config) -> bool:
    """``needs_proxy`` of algorithms that distil on the server: ``server.distill_steps > 0``."""
    return config.server.distill_steps > 0


@dataclass(frozen=True)
class AlgorithmSpec:
    """An algorithm described for the experiment layer (see the module docstring).

    Attributes:
      name: the ``algorithm.name`` value and the config namespace of ``hypers``.
      help: one line for ``fedjax-kd list``.
      build: ``build(ctx: BuildContext) -> FederatedAlgorithm``; raises
        ValueError for arguments the builder refuses (the message names the
        hyperparameter, so the CLI can name its config key).
      hypers: ``{name: Hyper}``, the keys ``<name>.<hyper>``.
      needs_proxy: ``needs_proxy(config) -> bool``: whether this run needs the
        server's proxy set (``data.proxy_fraction > 0``).
      groups: accepts heterogeneous architecture groups (``model.student_groups``).
      stragglers: supports FedProx's stragglers (``client.straggler_fraction``).
      robust: takes a robust aggregator and attacks (``server.aggregator``,
        ``attack.*``; its build passes ``**ctx.robust``).
      private_outputs: clips and noises what its clients publish for
        distillation (logits, soft labels, per-label means) with
        ``dp.output_clip_norm`` (its build passes ``ctx.robust["output_dp"]``).
      private_updates: without ``robust``, still clips and noises its
        clients' model updates (DP-FedAvg, ``dp.clip_norm``; its build passes
        ``ctx.robust["dp"]``): teacher_student and FedDF.
      teacher: builds ``model.teacher`` (a teacher, a mentor).
      rounds_dependent: ``rounds_dependent(config) -> bool``: whether this
        run's schedule spans ``rounds`` (then a finished run cannot be
        extended: FedKD's default energy schedule).
      per_client_state: keeps state on every client (mentors, personal models).
      renamed: ``{old key: hyper}``: keys of the flat schema before each
        component had its namespace (``algorithm.mu`` -> ``mu``), so an old
        config is told the new name.
    """

    name: str
    help: str
    build: Callable[[BuildContext], Any]
    hypers: Mapping[str, Hyper] = field(default_factory=dict)
    needs_proxy: Callable[[Any], bool] = _never
    groups: bool = False
    stragglers: bool = False
    robust: bool = False
    private_outputs: bool = False
    private_updates: bool = False
    teacher: bool = False
    rounds_dependent: Callable[[Any], bool] = _never
    per_client_state: bool = False
    renamed: Mapping[str, str] = field(default_factory=dict)

    def defaults(self) -> dict:
        """``{hyper: default}``."""
        return {k: h.default for k, h in self.hypers.items()}

    def supports(self) -> list[str]:
        """What it needs or supports, as words for ``fedjax-kd list``."""
        flags = {
            "groups": self.groups,
            "stragglers": self.stragglers,
            "robust aggregation, attacks, DP (Poisson, adaptive), uplink codecs": self.robust,
            "DP on published outputs": self.private_outputs,
            "DP-FedAvg": self.private_updates,
            "teacher": self.teacher,
            "per-client state": self.per_client_state,
            "a schedule over the run's length (see its keys)": self.rounds_dependent is not _never,
        }
        return [word for word, on in flags.items() if on]


class DataContext(NamedTuple):
    """Everything the experiment layer hands a dataset spec's ``build``.

    Attributes:
      hp: the dataset's options (its config namespace) as a dict.
      num_clients: ``data.num_clients``.
      partition: the partition to use (``data.partition``, or the dataset's
        own option named by its spec's ``partition_option``).
      partition_kwargs: the partitioner's arguments from ``data.*``
        (``alpha``, ``min_size``, ``shards_per_client``, ``sigma``).
      seed: the run's seed.
      proxy_fraction: ``data.proxy_fraction``.
      data_dir: ``data.dir``, the folder of a dataset read from files ("" = none).
    """

    hp: dict
    num_clients: int
    partition: str
    partition_kwargs: dict
    seed: int
    proxy_fraction: float
    data_dir: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset described for the experiment layer (``data.name=NAME``, keys ``NAME.*``).

    Attributes:
      name: the ``data.name`` value and the config namespace of ``hypers``.
      help: one line for ``fedjax-kd list``.
      build: ``build(ctx: DataContext) -> FederatedDataset``; raises
        ValueError for settings it cannot meet.
      hypers: ``{name: Hyper}``, the keys ``<name>.<hyper>``.
      partition_option: the name of an option in ``hypers`` that chooses the
        partition instead of ``data.partition`` (Synthetic's ``partition``:
        ``natural`` or a partitioner); None = ``data.partition``.
      renamed: ``{old key: option}``, as for :class:`AlgorithmSpec`.
      own_clients: under its natural partition (``partition_option`` =
        ``natural``) the files say how many clients there are, not
        ``data.num_clients`` (FEMNIST's writers, Shakespeare's roles).
    """

    name: str
    help: str
    build: Callable[[DataContext], Any]
    hypers: Mapping[str, Hyper] = field(default_factory=dict)
    partition_option: str | None = None
    renamed: Mapping[str, str] = field(default_factory=dict)
    own_clients: bool = False

    def defaults(self) -> dict:
        """``{option: default}``."""
        return {k: h.default for k, h in self.hypers.items()}


@dataclass(frozen=True)
class ModelSpec:
    """A model family described for the experiment layer (``model.student=NAME-W1-W2``).

    A model name is the family followed by its sizes joined by ``-``
    (``mlp-64-32``: hidden widths 64 and 32; ``cnn-16``: one 16-channel
    convolution; ``linear``: none).

    Attributes:
      name: the family, the first part of a model name.
      help: one line for ``fedjax-kd list``.
      build: ``build(sizes, feature_shape, num_classes) -> build_module(rngs)``,
        a function making the Flax NNX module (``fedjax_kd.models.from_nnx``);
        raises ValueError for inputs it cannot take.
      sizes: what the sizes are (``"hidden widths"``), or ``""`` for a family
        that takes none.
      example: a model name of this family, for help and errors.
      form: how a name is written when the sizes are not a list of one kind
        (``resnet-D[-G]``); "" = derived from ``sizes``.
      inputs: ``"features"`` (float features or uint8 pixels) or ``"tokens"``
        (int32 token ids: sequence models); the experiment layer refuses a
        dataset of the other kind with one line.
    """

    name: str
    help: str
    build: Callable[..., Any]
    sizes: str = ""
    example: str = ""
    inputs: str = "features"
    form: str = ""

    @property
    def pattern(self) -> str:
        """How a name of this family is written: ``mlp-W1[-W2...]``, ``linear`` or ``form``."""
        if self.form:
            return self.form
        if not self.sizes:
            return self.name
        letter = self.sizes.split()[-1][0].upper()
        return f"{self.name}-{letter}1[-{letter}2...]"
