"""The persistent compilation cache: where it lives, how it is switched off, same bits."""

import json
import os
import subprocess
import sys
from pathlib import Path

from fedjax_kd import cache


def test_default_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.default_dir() == tmp_path / "fedjax_kd" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.default_dir() == tmp_path / "home" / ".cache" / "fedjax_kd" / "jax"
    monkeypatch.setenv(cache.ENV, str(tmp_path / "mine"))
    assert cache.default_dir() == tmp_path / "mine"
    for off in ("", "off", "0", "OFF", " no "):
        monkeypatch.setenv(cache.ENV, off)
        assert cache.default_dir() is None


def _run(tmp_path: Path, name: str, env_cache: str) -> tuple[list[dict], str]:
    """One short `fedjax-kd run` in a fresh process; its records without wall times."""
    work = tmp_path / name
    env = {**os.environ, cache.ENV: env_cache, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    argv = ["run", "--no-progress", "--config.rounds=3", "--config.eval_every=1"]
    done = subprocess.run(
        [sys.executable, "-m", "fedjax_kd.cli", *argv, "--workdir", str(work)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "wall" not in k} for r in rows], done.stderr


def test_cold_warm_and_off_give_the_same_bits(tmp_path):
    store = tmp_path / "cache"
    cold, _ = _run(tmp_path, "cold", str(store))
    entries = {p.name for p in store.iterdir()}
    assert entries, "the first run cached nothing"
    warm, _ = _run(tmp_path, "warm", str(store))
    assert {p.name for p in store.iterdir()} == entries  # all hits: nothing new compiled
    off, _ = _run(tmp_path, "off", "off")
    assert cold == warm == off
