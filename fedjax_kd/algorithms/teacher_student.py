"""The founding loop: clients distil a global teacher into a small student.

From the project's founding document (see ``shared/REFERENCES.md``, "The
seed's fused loop"); the teacher update is FedDF-style ensemble distillation
(Lin et al., NeurIPS 2020, arXiv 2006.07242), which lets the teacher be larger
than the students (as in Fed-ET, Cho et al., IJCAI 2022, arXiv 2204.12703).
Each round:

1. The server sends the student params ``w`` and the teacher params ``v``.
2. Client ``k`` trains the student on its data with
   ``CE(f_w(x), y) + kd_weight * T^2 KL(softmax(g_v(x)/T) || softmax(f_w(x)/T))``;
   the teacher's logits ``g_v(x)`` are computed once per round on the client's
   examples, with no gradient into the teacher. Distillation is off before
   round ``kd_start_round`` (default 1: the round-0 teacher is untrained).
3. The server aggregates the student deltas (FedAvg weights, any server
   optimizer): ``w <- ServerOpt(w, sum_k (n_k/n) delta_k)``.
4. The server distils the ensemble of the cohort's local students ``w_k`` into
   the teacher on its unlabeled proxy set: target ``softmax(mean_k f_{w_k}(x)/T_s)``,
   ``distill_steps`` steps of ``distill_optimizer`` on minibatches of
   ``distill_batch_size`` (``batchmean`` KL times ``T_s^2``, ``T_s = 1``).
5. Both models go out in the next round.

With ``kd_weight = 0`` and ``distill_steps = 0`` the student trajectory is
exactly FedAvg's with the same seed (same client keys, same init key).

Privacy (Sources: ``shared/REFERENCES_NEXT.md`` A4, "DP for output sharing
and distillation", consequences 1-2): clients release two things, their
student updates and (with ``distill_steps > 0``) their local students' logits
on the proxy set, and each needs its own mechanism. ``dp`` makes the updates
DP-FedAvg's (:func:`~fedjax_kd.algorithms.fed_avg.fedavg_step`: each clipped
to ``dp.clip_norm``, noise once on the sum from the stream
``fed_avg.DP_STREAM``, divided by ``K``; metric ``dp_clipped_fraction``).
``output_dp`` privatizes the ensemble: each client's ``[P, C]`` logits block
on the whole proxy set is clipped to Frobenius norm ``output_dp.clip_norm``
(:func:`fedjax_kd.aggregate.ensemble_contribution`; a client without data or
a dropped straggler uploads zeros), ``N(0, (z S)^2)`` is added once to the
cohort's sum (stream ``aggregate.OUTPUT_DP_STREAM``) and the sum is divided by
the cohort size ``K``, not by the clients with data (metric
``dp_output_clipped_fraction``). The teacher's distillation on that target
and everything the clients receive are post-processing. ``dp`` alone leaves
the ensemble logits unprotected, and ``output_dp`` alone the updates: a
private run needs both (two Gaussian releases per round on the same cohort
for the accountant).

Communication per client and round: down the student params, plus the
teacher params when ``kd_weight > 0`` (clients need the teacher only to
distil); up the student delta and its weight. Compute added over FedAvg:
one teacher forward pass per real client example per round
(``teacher_forward_examples``) and, on the server, ``K * P`` student forward
passes for the ensemble targets plus ``distill_steps`` teacher training steps
(``server_forward_examples`` counts the forward passes).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_kd import aggregate, distill, privacy
from fedjax_kd.algorithms.fed_avg import (
    DP_STREAM,
    STRAGGLER_STREAM,
    check_stragglers,
    client_inputs,
    fedavg_step,
    train_loss,
)
from fedjax_kd.client import batched_apply, make_client_update
from fedjax_kd.compress import tree_bytes
from fedjax_kd.data.federated import check_cohort
from fedjax_kd.spec import (
    AlgorithmSpec,
    BuildContext,
    Hyper,
    at_least,
    positive,
    with_server_distillation,
)
from fedjax_kd.types import FederatedAlgorithm, Params, PyTree


class TeacherStudentState(NamedTuple):
    """Server state of :func:`teacher_student`.

    Attributes:
      params: global student params (the model clients train).
      opt_state: server optimizer state for the student.
      teacher: global teacher params.
      round: number of completed rounds (int32 scalar).
    """

    params: Params
    opt_state: PyTree
    teacher: Params
    round: jax.Array


def teacher_student(
    student,
    teacher,
    *,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    kd_weight: float = 1.0,
    temperature: float = 1.0,
    kd_start_round: int = 1,
    distill_optimizer: optax.GradientTransformation | None = None,
    distill_steps: int = 50,
    distill_batch_size: int = 128,
    distill_temperature: float = 1.0,
    uniform_weighting: bool = False,
    straggler_fraction: float = 0.0,
    drop_stragglers: bool = False,
    dp: privacy.DP | None = None,
    output_dp: privacy.DP | None = None,
) -> FederatedAlgorithm:
    """Builds the fused teacher–student loop.

    Args:
      student: the small model clients train (pure ``init``/``apply``).
      teacher: the global teacher (may be larger than the student).
      client_optimizer: optax optimizer for local training.
      server_optimizer: optax optimizer on the student pseudo-gradient.
      epochs: local epochs per round.
      batch_size: local minibatch size.
      kd_weight: weight of the client-side distillation from the teacher.
      temperature: client-side distillation temperature ``T``.
      kd_start_round: first round whose clients distil (earlier: ``kd_weight``
        acts as 0).
      distill_optimizer: server optimizer for the teacher's distillation
        (default FedDF's: clip global norm 5, then Adam lr 1e-3).
      distill_steps: teacher distillation steps per round (0 = frozen teacher).
      distill_batch_size: proxy minibatch size of the teacher's distillation.
      distill_temperature: temperature of the ensemble target.
      uniform_weighting: average student deltas uniformly.
      straggler_fraction: fraction of each cohort that are stragglers (FedProx's
        systems heterogeneity, :func:`~fedjax_kd.algorithms.fed_avg.client_inputs`,
        drawn from the stream ``STRAGGLER_STREAM``); 0 = none.
      drop_stragglers: drop stragglers (no training, no uplink, not in the
        ensemble) instead of keeping their ``U{1..E-1}`` epochs of work.
      dp: optional :class:`fedjax_kd.privacy.DP`: DP-FedAvg on the student
        updates (module docstring); None = none.
      output_dp: optional :class:`fedjax_kd.privacy.DP` on the ensemble
        logits the server distils from (module docstring); None = none.

    Returns:
      A :class:`~fedjax_kd.types.FederatedAlgorithm` whose ``round`` needs
      ``server_data["proxy_x"]`` when ``distill_steps > 0``; ``eval_models``
      gives ``student`` (headline) and ``teacher``.
    """
    if kd_weight < 0 or temperature <= 0 or distill_steps < 0 or distill_batch_size < 1:
        raise ValueError("teacher_student needs kd_weight >= 0, temperature > 0, steps >= 0")
    check_stragglers(straggler_fraction, epochs)
    aggregate.check_private_outputs("teacher_student", output_dp, dp)
    if distill_optimizer is None:
        distill_optimizer = optax.chain(optax.clip_by_global_norm(5.0), optax.adam(1e-3))
    client_update = make_client_update(
        student.apply,
        client_optimizer,
        epochs=epochs,
        batch_size=batch_size,
        kd_weight=kd_weight,
        temperature=temperature,
    )
    server_distill = distill.make_server_distill(
        teacher.apply,
        distill_optimizer,
        steps=distill_steps,
        batch_size=distill_batch_size,
        temperature=distill_temperature,
    )
    use_kd = kd_weight > 0
    output_clip = None if output_dp is None else output_dp.clip_norm

    def init(key: jax.Array) -> TeacherStudentState:
        params = student.init(key)  # the same init key as FedAvg: same student
        return TeacherStudentState(
            params=params,
            opt_state=server_optimizer.init(params),
            teacher=teacher.init(jax.random.fold_in(key, 1)),
            round=jnp.zeros((), jnp.int32),
        )

    def round_fn(state: TeacherStudentState, cohort, key: jax.Array, server_data=None):
        check_cohort(cohort)
        num_clients = cohort.size
        # As FedAvg: identical client streams.
        inputs = client_inputs(
            key,
            num_clients,
            epochs=epochs,
            straggler_fraction=straggler_fraction,
            drop_stragglers=drop_stragglers,
            straggler_key=jax.random.fold_in(key, STRAGGLER_STREAM),
        )
        kd_scale = (state.round >= kd_start_round).astype(jnp.float32)
        proxy_x = None
        if distill_steps > 0:
            if not server_data or "proxy_x" not in server_data:
                raise ValueError("teacher_student with distill_steps > 0 needs a proxy set")
            proxy_x = server_data["proxy_x"]

        def teacher_targets(x):  # in the training batch's shape: exact across paddings
            return batched_apply(teacher.apply, state.teacher, x, batch_size=batch_size)

        def ensemble_terms(out):  # this client's local student on the proxy set
            return aggregate.ensemble_contribution(
                student.apply, state.params, out, proxy_x, clip_norm=output_clip
            )

        dp_args = {}
        if dp is not None:
            dp_args = {"dp": dp, "dp_key": jax.random.fold_in(key, DP_STREAM)}

        step = fedavg_step(
            state.params,
            state.opt_state,
            cohort,
            inputs,
            client_update=client_update,
            server_optimizer=server_optimizer,
            uniform_weighting=uniform_weighting,
            targets_fn=teacher_targets if use_kd else None,
            kd_scale=kd_scale,
            extra_terms=None if proxy_x is None else ensemble_terms,
            **dp_args,
        )
        sums, params, opt_state = step.sums, step.params, step.opt_state
        new_teacher = state.teacher
        distill_metrics = {"distill_loss": jnp.zeros((), jnp.float32)}
        server_forward = 0
        if proxy_x is not None:
            if output_dp is None:
                target = sums["proxy_logits"] / jnp.maximum(sums["members"], 1.0)
            else:  # clipped blocks: noise once on the sum, divided by K
                output_key = jax.random.fold_in(key, aggregate.OUTPUT_DP_STREAM)
                total = sums["proxy_logits"]
                target = privacy.noised_mean(total, output_key, output_dp, num_clients)
            new_teacher, distill_metrics = server_distill(
                state.teacher, proxy_x, target, jax.random.fold_in(key, 1)
            )
            server_forward = num_clients * proxy_x.shape[0]
        # Down: the student, and the teacher when clients distil from it.
        downlink = step.downlink + (tree_bytes(state.teacher) if use_kd else 0)
        teacher_forward = sums["examples"] if use_kd else jnp.zeros(())
        metrics = {
            "train_loss": train_loss(sums),
            "uplink_bytes": step.uplink,
            "downlink_bytes": downlink,
            "finite": step.finite & aggregate.tree_all_finite(new_teacher),
            "teacher_forward_examples": teacher_forward.astype(jnp.int32),
            "server_forward_examples": jnp.asarray(server_forward, jnp.int32),
            **distill_metrics,
        }
        if dp is not None:
            metrics["dp_clipped_fraction"] = sums["dp_clipped"] / num_clients
        if output_dp is not None and proxy_x is not None:
            metrics["dp_output_clipped_fraction"] = sums["output_clipped"] / num_clients
        new_state = TeacherStudentState(
            params=params, opt_state=opt_state, teacher=new_teacher, round=state.round + 1
        )
        return new_state, metrics

    def eval_models(state: TeacherStudentState):
        return {"student": (student.apply, state.params), "teacher": (teacher.apply, state.teacher)}

    return FederatedAlgorithm(
        init=init, round=round_fn, eval_models=eval_models, client_update=client_update
    )


def _build(ctx: BuildContext) -> FederatedAlgorithm:
    hp = ctx.hp
    return teacher_student(
        ctx.student,
        ctx.teacher,
        kd_weight=hp["kd_weight"],
        temperature=hp["temperature"],
        kd_start_round=hp["kd_start_round"],
        distill_temperature=ctx.config.server.distill_temperature,
        dp=ctx.robust.get("dp"),
        output_dp=ctx.robust.get("output_dp"),
        **ctx.distill,
        **ctx.stragglers,
        **ctx.common,
    )


#: How the experiment layer builds the founding loop (keys ``teacher_student.*``).
SPEC = AlgorithmSpec(
    name="teacher_student",
    renamed={
        "algorithm.kd_weight": "kd_weight",
        "algorithm.temperature": "temperature",
        "algorithm.kd_start_round": "kd_start_round",
    },
    help="the founding loop: clients distil a global teacher (model.teacher) into the "
    "student; the server distils the students' ensemble into the teacher",
    build=_build,
    hypers={
        "kd_weight": Hyper(
            1.0, "weight of the clients' distillation from the teacher", **at_least(0)
        ),
        "temperature": Hyper(1.0, "the clients' distillation temperature T", **positive()),
        "kd_start_round": Hyper(1, "first round whose clients distil", **at_least(0)),
    },
    needs_proxy=with_server_distillation,
    stragglers=True,
    teacher=True,
    private_outputs=True,
    private_updates=True,
)
