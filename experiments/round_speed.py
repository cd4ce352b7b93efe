"""Where the default round's time goes, and the run loop before/after a change (issue 13, item 4).

Part 1, the profile (this tree, one process): the default config's compiled
round called ``--rounds`` times

* back to back with one host sync at the end (the executable's own time),
* with a host sync after every round (``jax.device_get`` of its metrics),
* inside ``simulate.run`` (the whole loop: dispatch, syncs, byte counters,
  progress bar off, evaluations every 10 rounds), per round,

the evaluation alone per call, one checkpoint save (what a run with a workdir
does at every evaluation by default), and the local training's floating-point work
(6 FLOPs per parameter and example slot of every local step, padded no-op
steps included) with the rate the executable reaches on it; then the compiled
round alone for other student widths (``--models``): what stays when the
arithmetic shrinks is the executable's fixed cost per round.

Part 2, with ``--before TREE`` (a checkout of another commit, e.g. ``git
worktree add /tmp/before <commit>``): ``fedjax-kd run`` of the default config
(``--rounds`` rounds) in fresh processes, alternating this tree and TREE;
per-round milliseconds ``(wall_s - compile_s) / rounds`` and whether the two
trees' evaluation records are identical.

Prints JSON. Usage::

    python experiments/round_speed.py [--reps 5] [--rounds 300] [--before /tmp/before]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def _ms(seconds: float, rounds: int) -> float:
    return round(seconds * 1e3 / rounds, 3)


def _compiled_round(overrides: list[tuple[str, str]]):
    """The config's round compiled alone.

    Returns ``(config, dataset, algorithm, data, state0, rounds_key, step)``.
    """
    import jax
    import jax.numpy as jnp

    from fedjax_kd import experiment, simulate

    config = experiment.resolve(None, overrides)
    dataset = experiment.build_dataset(config)
    algorithm = experiment.build_algorithm(config, dataset)
    init_key, rounds_key = simulate.seed_keys(config.seed)
    data = simulate.to_device(dataset.train)
    state0 = jax.jit(algorithm.init)(init_key)
    step_fn = simulate._make_round_step(
        algorithm,
        num_clients=dataset.num_clients,
        clients_per_round=config.clients_per_round,
        max_local_examples=min(config.client.max_examples, dataset.train.max_examples),
    )
    step = jax.jit(step_fn).lower(state0, data, {}, rounds_key, jnp.int32(0)).compile()
    return config, dataset, algorithm, data, state0, rounds_key, step


def profile(rounds: int, reps: int) -> dict:
    """Part 1 (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    from fedjax_kd import experiment, simulate

    config, dataset, algorithm, data, state0, rounds_key, step = _compiled_round(
        [("rounds", str(rounds))]
    )
    # The local training's matrix work, counted by hand (XLA's cost analysis counts a
    # loop body once): 6 FLOPs per parameter per example (forward and backward), for
    # every example slot of every local step, padded no-op steps included.
    params = sum(leaf.size for leaf in jax.tree.leaves(state0.params))
    cap = min(config.client.max_examples, dataset.train.max_examples)
    batch = min(config.client.batch_size, cap)
    steps = config.client.epochs * -(-cap // batch)
    flops = 6.0 * params * config.clients_per_round * steps * batch
    test = tuple(map(jnp.asarray, simulate.batch_test_set(dataset.test_x, dataset.test_y, 1024)))
    evaluate_fn = simulate._make_evaluate(lambda hp: algorithm, batch_size=1024)
    evaluate = jax.jit(evaluate_fn).lower({}, state0, *test).compile()

    def loop(sync_each_round: bool) -> float:
        state, kept = state0, []
        start = time.perf_counter()
        for r in range(rounds):
            state, metrics = step(state, data, {}, rounds_key, jnp.int32(r))
            if sync_each_round:
                jax.device_get(metrics)
            else:
                kept.append(metrics)
        jax.device_get(kept)
        jax.block_until_ready(state)
        return time.perf_counter() - start

    def evaluation() -> float:
        jax.block_until_ready(evaluate({}, state0, *test))
        start = time.perf_counter()
        for _ in range(20):
            jax.block_until_ready(evaluate({}, state0, *test))
        return (time.perf_counter() - start) / 20

    def whole_run() -> float:
        summary = simulate.run(
            algorithm, dataset, seed=0, progress=False, **experiment.run_settings(config)
        ).summary
        return summary["wall_s"] - summary["compile_s"]

    def checkpoint_save() -> float:
        from fedjax_kd import checkpoint

        with tempfile.TemporaryDirectory() as directory:
            checkpoint.save(directory, 0, state0)
            start = time.perf_counter()
            for r in range(1, 6):
                checkpoint.save(directory, r, state0, {"records": []})
            return (time.perf_counter() - start) / 5

    times = {"executable": [], "sync_each_round": [], "simulate_run": [], "evaluate": [],
             "checkpoint_save": []}  # fmt: skip
    loop(False)  # warm up
    for _ in range(reps):
        times["executable"].append(_ms(loop(False), rounds))
        times["sync_each_round"].append(_ms(loop(True), rounds))
        times["simulate_run"].append(_ms(whole_run(), rounds))
        times["evaluate"].append(round(evaluation() * 1e3, 3))
        times["checkpoint_save"].append(round(checkpoint_save() * 1e3, 3))
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        # executable, sync_each_round, simulate_run: per round; evaluate, checkpoint_save: per call
        "ms": times,
        "median_ms": median,
        "local_training_flops_per_round": flops,
        "local_steps_per_round": steps,
        "gflops_per_s_executable": round(flops / (median["executable"] * 1e-3) / 1e9, 2),
        "evaluations_per_round": 1 / config.eval_every,
    }


def by_model(rounds: int, reps: int, models: list[str]) -> dict:
    """The compiled round's own time (back to back, one sync) for other student models.

    What stays when the arithmetic shrinks (``linear``) is the executable's
    fixed cost per round; what grows with the width is the arithmetic.
    """
    import jax
    import jax.numpy as jnp

    out = {}
    for model in models:
        _, _, _, data, state0, rounds_key, step = _compiled_round([("model.student", model)])
        times = []
        for _ in range(reps + 1):  # the first repetition warms up
            state, start = state0, time.perf_counter()
            for r in range(rounds):
                state, _ = step(state, data, {}, rounds_key, jnp.int32(r))
            jax.block_until_ready(state)
            times.append(_ms(time.perf_counter() - start, rounds))
        params = sum(leaf.size for leaf in jax.tree.leaves(state0.params))
        out[model] = {"params": params, "ms_per_round": times[1:],
                      "median_ms": statistics.median(times[1:])}  # fmt: skip
    return out


def _run_tree(tree: Path, rounds: int) -> tuple[float, str]:
    """``fedjax-kd run`` in a fresh process with ``tree`` first on the path."""
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "PYTHONPATH": str(tree), "FEDJAX_KD_CACHE_DIR": "off"}
        # One checkpoint, after the last round: orbax's save (about 35 ms) at every
        # evaluation would otherwise be most of the loop (``checkpoint_cost``).
        command = [sys.executable, "-m", "fedjax_kd", "run", "--no-progress", "--workdir",
                   workdir, f"--config.rounds={rounds}",
                   f"--config.checkpoint_every={rounds}"]  # fmt: skip
        subprocess.run(command, check=True, env=env, cwd=tempfile.gettempdir(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        summary = json.loads((Path(workdir) / "summary.json").read_text())
        records = [
            {k: v for k, v in json.loads(line).items() if k != "wall_s"}
            for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()
        ]
    digest = hashlib.sha256(json.dumps(records).encode()).hexdigest()[:16]
    return (summary["wall_s"] - summary["compile_s"]) * 1e3 / rounds, digest


def before_after(before: Path, rounds: int, reps: int) -> dict:
    """Part 2 (see the module docstring)."""
    times = {"before": [], "after": []}
    digests = {"before": set(), "after": set()}
    for rep in range(reps):
        order = [("before", before), ("after", HERE)]
        for name, tree in order if rep % 2 == 0 else order[::-1]:
            ms, digest = _run_tree(tree, rounds)
            times[name].append(round(ms, 3))
            digests[name].add(digest)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "before_tree": str(before),
        "ms_per_round": times,
        "median_ms": median,
        "speedup": round(median["before"] / median["after"], 3),
        "records_identical": digests["before"] == digests["after"] and len(digests["after"]) == 1,
    }


def main(argv: list[str] | None = None) -> int:
    """Runs part 1 (and part 2 with ``--before``) and prints the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--before", type=Path, help="another checkout to compare the run loop with")
    p.add_argument("--models", default="linear,mlp-8,mlp-64,mlp-256")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    out = {"rounds": args.rounds, "profile": profile(args.rounds, args.reps)}
    out["by_model"] = by_model(args.rounds, args.reps, args.models.split(","))
    if args.before is not None:
        out["before_after"] = before_after(args.before, args.rounds, args.reps)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
