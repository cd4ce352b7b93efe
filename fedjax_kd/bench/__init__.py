"""``fedjax-kd bench``: the vmapped round side by side with a per-client loop and central training.

What is measured
----------------
For each algorithm (``fedavg``; ``teacher_student`` with a frozen teacher) and
each cohort size ``K``, three ways of doing the same work on the same examples,
with the same model, minibatch size, optimizer and number of passes:

* ``vmap``: the algorithm's own round, ``jax.jit(algorithm.round)``, with the
  K clients ``jax.vmap``-ped inside one compiled program. This is what
  ``fedjax-kd run`` executes every round.
* ``loop``: the per-client dispatch of FedJAX-style simulators, built as the
  fastest honest baseline: the very same client update (the algorithm's own,
  ``algorithm.client_update``) compiled ONCE, then called once per client from a Python
  loop. Each call slices client ``k``'s examples and key out of the same
  stacked cohort (a ``dynamic_slice``, no host work), runs local training
  (for ``teacher_student`` it first computes the frozen teacher's logits on
  that client's examples, in the same compiled call) and adds ``n_k * delta_k``
  to a donated running sum. One compiled call splits the round key into the
  per-client keys (as the algorithm does) and one compiled server step divides
  by ``sum n_k`` and applies the same ``aggregate.server_update``. Calls are
  dispatched asynchronously; the round ends with ``block_until_ready``.
  Nothing is deliberately slowed: fusing the teacher forward, the update and
  the accumulation into one call per client is the fewest dispatches a
  per-client loop can make. The benchmark checks, on every run, that the loop
  and the vmapped round give the same server params after one round from the
  same state and key (``max_abs_diff_vs_vmap`` in the loop's row).
* ``central``: centralized training on the pooled ``K * n`` examples, the
  reference ("the limit"): plain training of one model, here with the same
  client update applied to one "client" holding all examples (one
  ``lax.scan`` over ``epochs * K * n / batch_size`` minibatches of the same
  size), the teacher's logits computed once on all examples, then the same
  server step. It runs exactly as many minibatch steps on as many examples as
  the K clients together (``--examples-per-client`` must be a multiple of
  ``--batch-size``; rows record ``sgd_steps``).

Server-side distillation is OFF (``distill_steps=0``, frozen teacher, and
``kd_start_round=0`` so every timed round distils): the teacher_student rows
measure the client-side cost of knowledge distillation only, which is what the
FLOP prediction below covers. Server distillation is a fixed per-round cost
independent of K (``distill_steps`` teacher steps on the proxy set) and is not
measured here.

Workload
--------
Each of the K clients holds exactly ``n`` (default 64) examples, so nothing is
padded. ``--input`` chooses what an example is; all are drawn directly with
NumPy (``seed``), deterministically (:func:`make_cohort`):

* ``features:N`` (default ``features:60``): the FedProx Synthetic-IID
  distribution (Li et al., arXiv 1812.06127): ``x ~ N(0, diag(j^-1.2))`` in N
  dimensions, ``y = argmax(x W + b)`` with one global ``W, b ~ N(0, 1)`` (10
  classes), rather than through :func:`fedjax_kd.data.synthetic`, whose
  heavy-tailed client sizes would need padding;
* ``image:HxWxC`` (e.g. ``image:32x32x3``, CIFAR-size): uniformly random
  uint8 pixels, ``y = argmax((x / 255 - 1/2) W + b)`` over the flattened
  pixels (10 classes); the models scale the pixels to ``[0, 1]`` inside the
  compiled round (``models.prepare_inputs``), so the cohort stays uint8 on
  the device;
* ``tokens:T:V`` (e.g. ``tokens:80:81``, Shakespeare-size): int32 windows of
  T tokens of one fixed random Markov chain on V tokens (4 successors per
  token), the label the token that follows (V classes).

Sequence models (``lstm-...``, ``transformer-...``) take ``tokens`` only, the
others features or pixels only; rows record ``input``, ``input_kind``,
``input_shape``, ``input_dtype``, ``num_classes``, the ``student`` and the run's
``teacher_model``. Default models: student ``mlp-64``, teacher
``mlp-256-256``; batch 32, one local epoch, client SGD lr 0.05, server SGD lr
1 (FedAvg).

How it is timed
---------------
All methods of one K are compiled first (``compile_s``: trace + lower +
compile, via ``jax.jit(f).lower(...).compile()``; for ``loop`` the sum of its
three small programs), run once (warm-up and the loop/vmap equality check),
then timed in rotation -- every (algorithm, method) of that K, and the
teacher-forward diagnostic, once per repetition, in the same order -- so that
slow phases of a shared machine hit all methods alike. Each method carries
its own state from round to round (its rounds really train).
In each repetition a method runs a BURST of ``B`` consecutive rounds (each
ending in ``block_until_ready``), as rounds follow one another in a real
simulation; the repetition's time is the burst's time divided by ``B``.
``B`` is the same for every method of one K: ``--burst B``, or by default
``ceil(0.02 s / fastest method's warm-up round)`` clipped to ``[1, 10]``
(8-9 rounds at K=10 in the records, 1 from about K=1000 on; rows record
``burst``). With ``B = 1``
each round runs right after the other methods' rounds, with the caches and
thread pool they left behind; that cold start is a cost a run of consecutive
rounds does not pay, and it weighs most on the fastest (smallest) rounds.
``s_per_round`` is the MEDIAN over ``--reps`` repetitions
(``s_per_round_all`` lists them); ``examples_per_s = epochs * K * n /
s_per_round``. ``peak_rss_mb`` is the process's ``ru_maxrss`` after that
method's last timed round: it is a high-water mark, monotone over the whole
process (it never goes down from one K to the next) and, since methods are
interleaved, shared by the methods of one K rather than attributable to one.

With ``--max-loop-seconds S`` the loop is first timed on a few clients; if its
estimated ``(reps + 1)`` full rounds would take longer than ``S`` seconds its
row has ``null`` numbers and a ``skipped`` note with the estimate: a number is
never extrapolated into the table.

Reading the ratios
------------------
* ``vmap/central`` (examples/s): how close the simulated round comes to
  training one model on the pooled data; 1.0 means simulating K clients costs
  nothing over plain training. It can exceed 1: central's minibatch steps are
  sequential, while vmap runs the K clients' steps as batched matmuls.
* ``vmap/loop``: the speed-up of one compiled vmapped round over per-client
  dispatch of the same compiled client update.
* KD overhead: ``teacher_student`` round time minus ``fedavg`` round time
  (``extra_s``), next to two predictions from the teacher's forward FLOPs
  ``F_teacher * K * n`` per round (forward FLOPs per example: for dense
  models exactly ``F = sum_layers 2 * in * out``; for the others XLA's cost
  analysis of the compiled forward pass on one example, every iteration of a
  ``lax.scan`` counted (XLA's own count takes a loop body once); rows record
  ``student_flops_source`` / ``teacher_flops_source``; the teacher runs once
  per example per round: its logits are computed once, not once per step).
  They differ in the FLOP rate assumed. ``pred@student = fedavg_s *
  F_teacher / (3 * epochs * F_student)`` (a training step counted as 3
  forward passes) assumes the teacher's wide matmuls run at the FLOP rate of
  the student's narrow training steps. ``pred@teacher = F_teacher * K * n /
  R_teacher`` uses the rate ``R_teacher`` that the teacher's forward pass on
  the cohort reaches when timed alone in the same rotation, in the row's
  chunks (the whole cohort for ``loop`` and ``central``), so it equals that
  time (JSON ``teacher_forward_s``); had the teacher run once per local
  step, ``extra_s`` would be ``epochs`` times larger than it. With
  ``--compare-chunk`` the chunked vmap rows get a KD line of their own.

Knobs (issue item 6): ``--dtype f32,bf16`` runs every method with the models'
params and float inputs cast to bfloat16 inside ``apply`` (uint8 pixels are
scaled to ``[0, 1]`` first, token ids stay int32; f32 master params,
gradients and optimizer); ``--donate`` adds a ``vmap`` row whose round donates
the state's buffers (``donate_argnums=0``). Both appear as separate rows
(``dtype``, ``donate``) measured in the same rotation. ``--chunk-size C``
runs the vmap rows' cohort in chunks of C clients (vmap inside a chunk,
``lax.scan`` across chunks, as ``client_chunk_size`` does in ``fedjax-kd
run``; JSON ``chunk_size``); ``--compare-chunk C`` instead ADDS a vmap row
chunked by C beside the unchunked one, in the same rotation, with its own
ratio columns (``cC/central``, ``cC/loop``, ``cC/vmap``). The third knob of
item 6, a block of rounds inside one compiled loop, is not measured here.

Entry points: :func:`add_arguments` + :func:`run` (for the ``fedjax-kd``
command), :func:`main` (``python -m fedjax_kd.bench``), and
:func:`run_benchmark` / :func:`format_table` for library use.

The package, one idea a file:

* :mod:`~fedjax_kd.bench.options`: :class:`BenchConfig`, ``--input``
  (:func:`parse_input`) and the command-line options (no JAX: ``fedjax-kd
  --help`` reads them);
* :mod:`~fedjax_kd.bench.workload`: the cohort (:func:`make_cohort`), the
  models and whether they take the input (:func:`check_model`), and their
  FLOPs (:func:`forward_flops`);
* :mod:`~fedjax_kd.bench.methods`: the algorithm's compiled round and the
  baselines built around the same client update (:func:`build_methods`);
* :mod:`~fedjax_kd.bench.timing`: compiling, warming up and timing the methods
  in rotation (:func:`run_benchmark`);
* :mod:`~fedjax_kd.bench.table`: the side-by-side table (:func:`format_table`);
* :mod:`~fedjax_kd.bench.cli`: ``fedjax-kd bench`` (:func:`run`, :func:`main`).

Names are imported from their module on first use (PEP 562), so importing
the package imports no JAX.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    **dict.fromkeys(
        (
            "ALGORITHMS", "AUTO_BURST_S", "DEFAULT_CLIENTS", "DEFAULT_INPUT", "DTYPES",
            "INPUT_KINDS", "MAX_AUTO_BURST", "METHODS", "NUM_CLASSES", "NUM_FEATURES",
            "PROBE_CLIENTS", "USAGE", "BenchConfig", "BenchError", "BenchInput",
            "add_arguments", "parse_input",
        ),
        "options",
    ),
    **dict.fromkeys(
        (
            "check_model", "create_model", "flops_source", "forward_flops", "make_cohort",
            "model_flops", "xla_forward_flops",
        ),
        "workload",
    ),
    **dict.fromkeys(("Method", "build_methods"), "methods"),
    **dict.fromkeys(
        ("run_benchmark", "_Entry", "_auto_burst", "_row", "_skip_slow_loops", "_warm_up"),
        "timing",
    ),
    **dict.fromkeys(("format_table",), "table"),
    **dict.fromkeys(("run", "main"), "cli"),
}  # fmt: skip

__all__ = sorted(name for name in _EXPORTS if not name.startswith("_"))


def __getattr__(name: str):
    """Imports a name from the bench module that defines it, on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedjax_kd.bench' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fedjax_kd.bench.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
