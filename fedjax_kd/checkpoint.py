"""Checkpoints of a run's whole state: save, find the latest valid one, restore.

A checkpoint directory holds one sub-directory per saved round::

    checkpoints/
      round_00000010/             an orbax checkpoint (StandardCheckpointHandler)
        commit_success.txt        orbax's commit marker, written after its atomic rename
        fedjax_kd.json            our sidecar, written last (atomically): the round,
        ...                       the extra values and a sha256 of the state's leaves

The state pytree is saved as its flat list of leaves (host numpy arrays named
``leaf_00000``, ...), so any NamedTuple/dict/tuple state saves the same way;
restoring unflattens them into the structure of a template (the freshly
initialised state, or ``jax.eval_shape`` of the algorithm's ``init``).

A checkpoint counts only when it is complete and intact: its name is
``round_<N>`` (orbax's temporary ``*.orbax-checkpoint-tmp*`` directories are
ignored), it has orbax's commit marker and our sidecar, every file matches the
sha256 the sidecar recorded for it at save time, orbax restores it, every
leaf has the template's shape and dtype, and the sha256 of the restored bytes
equals the sidecar's. :func:`latest_valid` walks back from the newest checkpoint
to the first one that passes, with a ``warning:`` line on stderr for each one it
skips. Saving is synchronous (orbax's ``Checkpointer``, not its async variant),
so a checkpoint is complete when :func:`save` returns.

Only one process writes (multi-host runs leave checkpointing to the caller).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from fedjax_kd.workdir import write_atomic

#: Checkpoints kept by :func:`save` (older ones are deleted); more than one, so a
#: corrupt latest checkpoint can fall back to the one before it.
KEEP = 3
#: Name of our sidecar inside a checkpoint directory.
SIDECAR = "fedjax_kd.json"
#: Orbax writes this file into a checkpoint once its atomic rename is done.
COMMIT_MARKER = "commit_success.txt"
FORMAT = 1
_NAME = re.compile(r"round_(\d{8,})")


class Restored(NamedTuple):
    """A restored checkpoint.

    Attributes:
      round: number of completed rounds when it was saved.
      state: the state pytree (numpy leaves; PRNG-key leaves as JAX key arrays),
        with the template's structure.
      extra: the JSON values saved with it (see :func:`save`).
    """

    round: int
    state: Any
    extra: dict


class CheckpointError(ValueError):
    """A checkpoint is incomplete or corrupt (the message says why)."""


def path_for(directory: str | os.PathLike, round_: int) -> Path:
    """The directory of round ``round_``'s checkpoint inside ``directory``."""
    return Path(directory) / f"round_{round_:08d}"


def rounds(directory: str | os.PathLike) -> list[int]:
    """Rounds of the checkpoint directories in ``directory`` (valid or not), ascending.

    Orbax's temporary directories (a save that never finished) are not listed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _NAME.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append(int(match.group(1)))
    return sorted(found)


def _is_key(leaf) -> bool:
    return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _host_leaves(tree) -> list[np.ndarray]:
    """The leaves of ``tree`` as host numpy arrays (PRNG keys as their key data)."""
    leaves = []
    for leaf in jax.tree.leaves(tree):
        if _is_key(leaf):
            leaf = jax.random.key_data(leaf)
        leaves.append(np.asarray(jax.device_get(leaf)))
    return leaves


def _state_digest(leaves: list[np.ndarray]) -> str:
    """sha256 (hex) over the dtypes, shapes and bytes of ``leaves``, in order."""
    h = hashlib.sha256()
    for leaf in leaves:
        h.update(f"{leaf.dtype.str}{leaf.shape}".encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def _checkpointer():
    import orbax.checkpoint as ocp  # ~1 s to import: only when checkpoints are used

    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def _items(leaves: list[np.ndarray], round_: int) -> dict:
    # Orbax cannot save zero-size arrays (their template restores them) and wants
    # at least one array: the round is saved too, and checked on restore.
    items = {f"leaf_{i:05d}": leaf for i, leaf in enumerate(leaves) if leaf.size}
    items["round"] = np.asarray(round_, np.int64)
    return items


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _file_digests(path: Path) -> dict[str, str]:
    """sha256 (hex) of every file under checkpoint ``path`` but the sidecar, by relative path."""
    digests = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        name = f.relative_to(path).as_posix()
        if name in (SIDECAR, SIDECAR + ".tmp"):
            continue
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
        digests[name] = h.hexdigest()
    return digests


#: Room a checkpoint needs beyond its arrays' bytes (orbax's metadata and
#: manifest files: about 40 KiB for the models here), checked before writing.
SPACE_MARGIN = 1 << 20


def _check_space(directory: Path, nbytes: int) -> None:
    """Raises ENOSPC before writing when ``directory`` lacks room for a checkpoint.

    A save that ran out of space midway would be cleaned up anyway; checking
    first keeps the previous checkpoints' disk untouched and orbax's threads
    from failing noisily.
    """
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return  # cannot tell: let the write itself fail if it must
    needed = 2 * nbytes + SPACE_MARGIN
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"{os.strerror(errno.ENOSPC)} (a checkpoint needs about {needed} bytes, {free} free)",
            str(directory),
        )


@contextlib.contextmanager
def _quiet_orbax():
    """Silences orbax's background-thread error logs (absl) while saving.

    A failed save raises in the caller, which reports it in one line; the
    same failure logged from orbax's threads would add pages of tracebacks.
    """
    import logging

    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _remove_unfinished(directory: Path, final: Path) -> None:
    """Removes what a failed save of ``final`` left (its temporary directories)."""
    for partial in [final, *directory.glob(final.name + ".*")]:
        _remove(partial)


def save(
    directory: str | os.PathLike,
    round_: int,
    state,
    extra: dict | None = None,
    *,
    keep: int = KEEP,
) -> Path:
    """Saves ``state`` after ``round_`` rounds into ``directory/round_<N>``; returns that path.

    Blocks until the checkpoint is complete: orbax writes the arrays to a
    temporary directory and renames it, then the sidecar (round, ``extra``,
    sha256 of the leaves) is written atomically; a checkpoint without it is not
    valid. Then deletes all but the newest ``keep`` checkpoints and any
    unfinished temporary directories.

    Args:
      directory: the checkpoints directory (created if missing).
      round_: number of completed rounds.
      state: the state pytree (device or host arrays; fetched to the host).
      extra: JSON-serialisable values restored with the state.
      keep: number of checkpoints to keep (>= 1).
    """
    directory = Path(directory).absolute()  # orbax wants absolute paths
    directory.mkdir(parents=True, exist_ok=True)
    leaves = _host_leaves(state)
    final = path_for(directory, round_)
    for stale in [final, *directory.glob(final.name + ".*")]:  # an earlier save of this round
        _remove(stale)
    _check_space(directory, sum(leaf.nbytes for leaf in leaves))
    try:
        with _quiet_orbax(), _checkpointer() as checkpointer:
            import orbax.checkpoint as ocp

            checkpointer.save(final, args=ocp.args.StandardSave(_items(leaves, round_)))
    except OSError:
        _remove_unfinished(directory, final)
        raise
    except Exception as e:  # orbax/tensorstore wrap the OS error in their own types
        _remove_unfinished(directory, final)
        text = str(e)
        code = (
            errno.ENOSPC if "No space left" in text or "RESOURCE_EXHAUSTED" in text else errno.EIO
        )
        raise OSError(code, os.strerror(code), str(final)) from None
    sidecar = {
        "format": FORMAT,
        "round": round_,
        "num_leaves": len(leaves),
        "sha256": _state_digest(leaves),
        # Checked before orbax reads anything: damaged files are caught without
        # handing them to orbax (whose failed reads leave async noise on stderr).
        "files": _file_digests(final),
        "extra": extra or {},
    }
    try:
        write_atomic(final / SIDECAR, json.dumps(sidecar, indent=1) + "\n")
    except OSError:
        _remove_unfinished(directory, final)  # arrays without a sidecar are no checkpoint
        raise
    prune(directory, keep=keep)
    return final


def prune(directory: str | os.PathLike, *, keep: int = KEEP, above: int | None = None) -> None:
    """Deletes unfinished saves and all but the newest ``keep`` checkpoints in ``directory``.

    With ``above``, first deletes every checkpoint of a round > ``above`` (the
    ones past the checkpoint a run resumes from: corrupt, or of a longer run).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    present = rounds(directory)
    if above is not None:
        for r in present:
            if r > above:
                _remove(path_for(directory, r))
        present = [r for r in present if r <= above]
    for r in present[: max(len(present) - keep, 0)]:
        _remove(path_for(directory, r))
    for entry in directory.iterdir():
        if entry.name.startswith("round_") and not _NAME.fullmatch(entry.name):
            _remove(entry)  # orbax's *.orbax-checkpoint-tmp* of a save that never finished


def _leaf_template(leaf):
    if _is_key(leaf):
        leaf = jax.eval_shape(jax.random.key_data, leaf)
    return np.dtype(leaf.dtype), tuple(leaf.shape)


def restore(path: str | os.PathLike, template) -> Restored:
    """Restores the checkpoint at ``path`` into the structure of ``template``.

    Args:
      path: a ``round_<N>`` directory written by :func:`save`.
      template: a pytree with the state's structure, shapes and dtypes (arrays
        or ``jax.ShapeDtypeStruct``, e.g. ``jax.eval_shape(algorithm.init, key)``).

    Raises:
      CheckpointError: the checkpoint is incomplete, corrupt, or does not fit
        ``template``.
    """
    path = Path(path).absolute()  # orbax wants absolute paths
    match = _NAME.fullmatch(path.name)
    if not match or not path.is_dir():
        raise CheckpointError("not a checkpoint directory")
    if not (path / COMMIT_MARKER).is_file():
        raise CheckpointError(f"no {COMMIT_MARKER} (orbax never finished writing it)")
    try:
        meta = json.loads((path / SIDECAR).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no {SIDECAR} (the save never finished)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"unreadable {SIDECAR} ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{SIDECAR} has an unknown format")
    round_ = int(match.group(1))
    if meta.get("round") != round_:
        raise CheckpointError(f"{SIDECAR} is for round {meta.get('round')}, not {round_}")
    template_leaves, treedef = jax.tree.flatten(template)
    if meta.get("num_leaves") != len(template_leaves):
        raise CheckpointError(
            f"it holds {meta.get('num_leaves')} arrays, the state has {len(template_leaves)} "
            "(a different algorithm or model?)"
        )
    files = meta.get("files")
    if isinstance(files, dict):
        actual = _file_digests(path)
        damaged = sorted(
            name for name in set(files) | set(actual) if files.get(name) != actual.get(name)
        )
        if damaged:
            raise CheckpointError(
                f"{len(damaged)} of its files changed or are missing since it was saved "
                f"(e.g. {damaged[0]})"
            )
    specs = [_leaf_template(leaf) for leaf in template_leaves]
    target = _items([np.zeros(shape, dtype) for dtype, shape in specs], round_)
    try:
        with _checkpointer() as checkpointer:
            import orbax.checkpoint as ocp

            items = checkpointer.restore(path, args=ocp.args.StandardRestore(target))
    except Exception as e:  # orbax/tensorstore raise many kinds on damaged files
        message = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise CheckpointError(f"orbax cannot read it ({type(e).__name__}: {message})") from None
    if int(np.asarray(items["round"])) != round_:
        raise CheckpointError(f"its arrays are for round {int(items['round'])}, not {round_}")
    leaves = []
    for i, (dtype, shape) in enumerate(specs):
        name = f"leaf_{i:05d}"
        leaf = np.asarray(items[name]) if name in items else np.zeros(shape, dtype)
        if leaf.dtype != dtype or leaf.shape != shape:
            raise CheckpointError(
                f"array {i} is {leaf.dtype}{list(leaf.shape)}, the state's is {dtype}{list(shape)}"
            )
        leaves.append(leaf)
    if _state_digest(leaves) != meta.get("sha256"):
        raise CheckpointError("its arrays do not match the sha256 in the sidecar")
    # A key dtype carries its PRNG implementation (also on a ShapeDtypeStruct).
    leaves = [
        jax.random.wrap_key_data(leaf, impl=t.dtype._impl) if _is_key(t) else leaf
        for leaf, t in zip(leaves, template_leaves, strict=True)
    ]
    return Restored(round_, jax.tree.unflatten(treedef, leaves), dict(meta.get("extra") or {}))


def _warn(path: Path, reason: str) -> None:
    print(
        f"warning: skipping checkpoint {path}: {reason}; trying the one before it",
        file=sys.stderr,
        flush=True,
    )


def latest_valid(
    directory: str | os.PathLike,
    template,
    *,
    on_skip: Callable[[Path, str], None] | None = _warn,
) -> Restored | None:
    """The newest checkpoint in ``directory`` that restores intact, or None if none does.

    Each newer checkpoint that is incomplete or corrupt is reported to
    ``on_skip(path, reason)`` (default: one ``warning:`` line on stderr) and
    skipped. See :func:`restore` for ``template``.
    """
    for r in reversed(rounds(directory)):
        path = path_for(directory, r)
        try:
            return restore(path, template)
        except CheckpointError as e:
            if on_skip is not None:
                on_skip(path, str(e))
    return None
