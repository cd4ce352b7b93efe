"""Where the default round's time goes: one host sync per round vs one per block.

Compiles the default config's round once and calls it 100 times, alternately
fetching every round's metrics (``jax.device_get``, what ``simulate.run``
does with ``rounds_per_call=1``) and fetching all of them once at the end.
Prints JSON: ms per round for each, repetition by repetition, and whether the
two give bit-identical states (they must: the same executable on the same
inputs). Issue 13, item 4 (the per-round floor).

Usage::

    python experiments/round_floor.py [--reps 3] [--rounds 100]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_kd import experiment, simulate


def main(argv: list[str] | None = None) -> int:
    """Times both ways alternately and prints the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=100)
    args = p.parse_args(argv)
    config = experiment.resolve(None, [])
    dataset = experiment.build_dataset(config)
    algorithm = experiment.build_algorithm(config, dataset)
    init_key, rounds_key = simulate.seed_keys(config.seed)
    data = jax.tree.map(jnp.asarray, dataset.train)
    state0 = jax.jit(algorithm.init)(init_key)
    step_fn = simulate._make_round_step(
        algorithm,
        num_clients=dataset.num_clients,
        clients_per_round=config.clients_per_round,
        max_local_examples=dataset.train.max_examples,
        client_chunk_size=None,
        mesh=None,
    )
    step = jax.jit(step_fn).lower(state0, data, {}, rounds_key, jnp.int32(0)).compile()

    def run(sync_each_round: bool):
        state, fetched = state0, []
        for r in range(args.rounds):
            state, metrics = step(state, data, {}, rounds_key, jnp.int32(r))
            if sync_each_round:
                fetched.append(jax.device_get(metrics))
                bool(fetched[-1]["finite"])
            else:
                fetched.append(metrics)
        jax.device_get(fetched)
        return jax.block_until_ready(state)

    times = {"sync_each_round": [], "sync_once": []}
    finals = {}
    for _ in range(args.reps):
        for name in times:
            start = time.perf_counter()
            finals[name] = run(name == "sync_each_round")
            times[name].append(round((time.perf_counter() - start) * 1e3 / args.rounds, 3))
    same = all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(finals["sync_each_round"]),
            jax.tree.leaves(finals["sync_once"]),
            strict=True,
        )
    )
    print(json.dumps({"ms_per_round": times, "rounds": args.rounds, "bit_identical": same}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
