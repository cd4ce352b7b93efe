"""Runtime of the dataset recipes on stand-in files (the real ones cannot be downloaded here).

For FEMNIST (LEAF JSON), Shakespeare (LEAF JSON), CIFAR-10 (the Python
pickles) and StackOverflow (TFF's HDF5 files and ``stackoverflow.word_count``)
it writes files in exactly the real distributions' layout, but subsampled and
filled with random content (random pixels, characters or Zipf-distributed
words, the real shapes and label ranges, ``--clients`` writers, speaking roles
or users with the real datasets' typical sizes), then runs the recipe's ``fedjax-kd run``
command from ``experiments/README.md`` for ``--rounds`` rounds and records
the first load (parse + cache), the second load (from the ``.npz`` cache),
``compile_s`` and the seconds per round. The accuracy of random content is
meaningless and is not reported; the real files change the number of clients
and examples, not the cost of a round, which is set by the cohort (clients
per round x examples per client x model).

Usage::

    python experiments/recipe_timing.py --json experiments/results/bench/recipes.json
    python experiments/recipe_timing.py --recipes femnist --rounds 3     # one recipe, quick

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fedjax_kd.data.benchmarks import SHAKESPEARE_LETTERS

#: Each recipe: its config overrides (as in experiments/README.md's recipes).
RECIPES = {
    "femnist": [
        "--config.data.name=femnist",
        "--config.model.student=cnn5-32-64-2048",
        "--config.clients_per_round=10",
        "--config.client.epochs=1",
        "--config.client.batch_size=10",
        "--config.client.lr=0.05",
        "--config.eval_every=1000",
    ],
    "shakespeare": [
        "--config.data.name=shakespeare",
        "--config.model.student=lstm-8-256-256",
        "--config.clients_per_round=10",
        "--config.client.epochs=1",
        "--config.client.batch_size=10",
        "--config.client.lr=0.8",
        "--config.client.max_examples=500",
        "--config.eval_every=1000",
    ],
    "cifar10": [
        "--config.data.name=cifar10",
        "--config.data.num_clients=100",
        "--config.data.partition=dirichlet",
        "--config.data.alpha=0.1",
        "--config.model.student=resnet-8",
        "--config.clients_per_round=10",
        "--config.client.epochs=1",
        "--config.client.batch_size=32",
        "--config.client.lr=0.05",
        "--config.client.augment=crop+flip",
        "--config.eval_every=1000",
    ],
    "stackoverflow": [
        "--config.data.name=stackoverflow",
        "--config.stackoverflow.max_clients=10000",
        "--config.model.student=lstm-96-670",
        "--config.clients_per_round=50",
        "--config.client.epochs=1",
        "--config.client.batch_size=16",
        "--config.client.max_examples=1000",
        "--config.client.lr=0.316",
        "--config.server.optimizer=adam",
        "--config.server.lr=0.01",
        "--config.server.eps=1e-5",
        "--config.eval_every=1000",
    ],
}


def _leaf(directory: Path, users: dict[str, dict]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    content = {
        "users": list(users),
        "num_samples": [len(u["y"]) for u in users.values()],
        "user_data": users,
    }
    (directory / "all_data_0.json").write_text(json.dumps(content))


def write_femnist(root: Path, clients: int, rng) -> None:
    """LEAF FEMNIST JSON: per writer ~200 train / ~25 test 784-float images in [0, 1]."""
    for split, mean in (("train", 200), ("test", 25)):
        users = {}
        for k in range(clients):
            n = max(1, int(rng.poisson(mean)))
            x = (rng.integers(0, 256, (n, 784)) / 255.0).round(6).tolist()
            users[f"f{k:04d}_{k % 100:02d}"] = {"x": x, "y": rng.integers(0, 62, n).tolist()}
        _leaf(root / split, users)


def write_shakespeare(root: Path, clients: int, rng) -> None:
    """LEAF Shakespeare JSON: per role ~300 train / ~40 test 80-character windows."""
    letters = np.array(list(SHAKESPEARE_LETTERS))
    for split, mean in (("train", 300), ("test", 40)):
        users = {}
        for k in range(clients):
            n = max(1, int(rng.poisson(mean)))
            text = "".join(letters[rng.integers(0, len(letters), n + 80)])
            users[f"PLAY_{k:04d}"] = {
                "x": [text[i : i + 80] for i in range(n)],
                "y": [text[i + 80] for i in range(n)],
            }
        _leaf(root / split, users)


def write_cifar10(root: Path, per_batch: int, rng) -> None:
    """The 6 CIFAR-10 pickles with ``per_batch`` random images each (real: 10,000)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {
            "batch_label": name,
            "labels": rng.integers(0, 10, per_batch).tolist(),
            "data": rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8),
            "filenames": [f"img_{i}.png" for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)


def write_stackoverflow(root: Path, clients: int, rng) -> None:
    """TFF's StackOverflow HDF5 files: per user ~400 train / ~60 test posts of ~14 words.

    Words are drawn from a Zipf(1.1) law over 20,000 made-up words (the real
    vocabulary is 10,000 of millions), so the top-10,000 vocabulary and the
    OOV rate look like real text's; ``stackoverflow.word_count`` lists the
    words by count.
    """
    import h5py

    root.mkdir(parents=True, exist_ok=True)
    words = np.array([f"w{i}" for i in range(20000)])
    counts = np.zeros(len(words), np.int64)
    for split, mean in (("train", 400), ("test", 60)):
        with h5py.File(root / f"stackoverflow_{split}.h5", "w") as f:
            for k in range(clients):
                n = max(1, int(rng.poisson(mean)))
                posts = []
                for length in np.maximum(1, rng.poisson(14, n)):
                    ids = np.minimum(rng.zipf(1.1, length) - 1, len(words) - 1)
                    counts[ids] += split == "train"
                    posts.append(" ".join(words[ids]).encode())
                group = f.create_group(f"examples/{k:08d}")
                group.create_dataset("tokens", data=posts, dtype=h5py.string_dtype())
                group.create_dataset("type", data=[b"question"] * n, dtype=h5py.string_dtype())
    order = np.argsort(-counts, kind="stable")
    lines = [f"{words[i]} {counts[i]}" for i in order]
    (root / "stackoverflow.word_count").write_text("\n".join(lines) + "\n")


def _run(directory: Path, overrides: list[str], rounds: int, workdir: Path) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "fedjax_kd.cli", "run", "--no-progress", "--workdir", str(workdir)]
    cmd += [f"--config.data.dir={directory}", f"--config.rounds={rounds}", *overrides]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed: {done.stderr.strip()[-600:]}")
    return json.loads((workdir / "summary.json").read_text()), wall


def main(argv: list[str] | None = None) -> int:
    """Writes the stand-in files, runs each recipe twice (cold and cached) and prints JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes")
    p.add_argument("--rounds", type=int, default=10, help="rounds per timed run")
    p.add_argument("--clients", type=int, default=100, help="writers / roles in the stand-ins")
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    names = [n for n in args.recipes.split(",") if n]
    unknown = sorted(set(names) - set(RECIPES))
    if unknown or args.rounds < 1 or args.clients < 10:
        print(
            f"error: unknown recipes {unknown}"
            if unknown
            else "error: --rounds >= 1, --clients >= 10",
            file=sys.stderr,
        )
        return 2
    rng = np.random.default_rng(0)
    result = {"rounds": args.rounds, "clients": args.clients, "recipes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            data = Path(tmp) / name
            start = time.perf_counter()
            if name == "femnist":
                write_femnist(data, args.clients, rng)
            elif name == "shakespeare":
                write_shakespeare(data, args.clients, rng)
            elif name == "stackoverflow":
                write_stackoverflow(data, args.clients, rng)
            else:
                write_cifar10(data, 2000, rng)
            written = time.perf_counter() - start
            size = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
            runs = []
            for attempt in ("cold", "cached"):
                summary, wall = _run(
                    data, RECIPES[name], args.rounds, Path(tmp) / f"{name}_{attempt}"
                )
                runs.append(
                    {
                        "load": attempt,
                        "process_wall_s": round(wall, 2),
                        "compile_s": summary["compile_s"],
                        "run_wall_s": summary["wall_s"],
                        "s_per_round": round(
                            (summary["wall_s"] - summary["compile_s"]) / args.rounds, 4
                        ),
                    }
                )
                print(f"{name} {attempt}: {runs[-1]}", file=sys.stderr, flush=True)
            result["recipes"][name] = {
                "overrides": RECIPES[name],
                "stand_in_bytes": size,
                "write_s": round(written, 2),
                "runs": runs,
            }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
