"""Run checkpoints: train state, teacher, PRNG key and JSON run state in one orbax step.

:class:`RunCheckpointer` is a thin layer over :class:`orbax.checkpoint.CheckpointManager`.
Each step is ONE composite checkpoint directory ``<directory>/<step>/`` holding the items

* ``state``      -- the :class:`amrsd_jax.update.TrainState` (params, optax state, step),
  written per shard (``StandardSave``);
* ``teacher``    -- the optional teacher / EMA params (same structure as ``state.params``);
* ``data_state``, ``config`` -- JSON dicts (data stream position, the run config);
* ``run``        -- JSON: the PRNG key (raw ``key_data`` + impl name), ``extra`` counters
  and which optional items the step holds.

Atomicity is orbax's: a step is written under ``<step>.orbax-checkpoint-tmp`` (or, on GCS,
without a ``commit_success.txt``) and only renamed / committed once every item of every
process is on disk, so a crash mid-save leaves a directory that :meth:`latest_step` and
:meth:`restore` never see (and that the next :class:`RunCheckpointer` on the directory
deletes). With ``async_save=True`` :meth:`save` returns once the arrays are copied off the
device buffers (so the caller may donate / overwrite them right away); the write and commit
run in a background thread until :meth:`wait_until_finished` or :meth:`close`.

Multi-host: every process must construct the checkpointer and call :meth:`save` /
:meth:`restore` collectively with the same arguments (orbax synchronises them with
barriers). Each process writes only the array shards it owns; the primary process
(``jax.process_index() == 0``) creates and commits the step directory and writes the JSON
items, so ``data_state`` / ``config`` / ``extra`` / ``rng_key`` must be the same on every
process (fold any per-host stream position into ``data_state`` yourself). The directory
must be on storage all processes see (shared file system or GCS). On restore every process
reads the JSON and the shards its target shardings need.

``directory`` may be a local path or a URL such as ``gs://bucket/run/checkpoints``; a URL
reaches orbax unchanged (a local path is made absolute).

A step that is committed but does not restore (a truncated file, a disk that filled up
under another tool) is *damaged*: :meth:`RunCheckpointer.restore_intact` moves it aside and
restores the newest step that is intact, reporting each damaged one in one line. A step whose
parameters are another model's (other names or shapes: another model, or ``model.scan_layers``
changed since it was saved) is not damaged: restoring raises :class:`CheckpointMismatch`
naming the differences, and nothing is moved.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ..distributed import all_processes, barrier
from .config import is_url

log = logging.getLogger(__name__)

_FORMAT_VERSION = 1
_STATE, _TEACHER, _DATA, _CONFIG, _RUN = "state", "teacher", "data_state", "config", "run"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, lost permissions); one line says which
    step and why, the steps already committed are untouched."""


class NoIntactCheckpoint(FileNotFoundError):
    """``--resume`` found checkpoints, but every one of them is damaged."""


class CheckpointMismatch(ValueError):
    """The checkpoint holds another model's parameters (names or shapes differ)."""


class DamagedStep(NamedTuple):
    """A committed step that did not restore, and where it was moved."""

    step: int
    reason: str  # one line
    moved_to: str | None


class _OrbaxOneLine(logging.Filter):
    """Orbax logs a failed background write with its traceback, several times over (hundreds
    of lines for one full disk); the error reaches the caller as a CheckpointWriteError (its
    cause keeps the traceback), so the log keeps one line per record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" in record.pathname and record.levelno >= logging.WARNING:
            record.msg = _squash(record.getMessage(), limit=240)
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


class _DropClosedLoopNoise:
    """``sys.unraisablehook`` that drops "Event loop is closed" (tensorstore callbacks of a
    failed orbax read or write landing on orbax's already closed asyncio loop: one traceback
    per array, hundreds for a damaged step); every other unraisable error goes through."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            self.previous(unraisable)


def _quiet_orbax_tracebacks() -> None:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxOneLine) for f in absl_logger.filters):
        absl_logger.addFilter(_OrbaxOneLine())
    if not isinstance(sys.unraisablehook, _DropClosedLoopNoise):
        sys.unraisablehook = _DropClosedLoopNoise(sys.unraisablehook)


def _squash(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(error: BaseException, limit: int = 160) -> str:
    """``"ValueError: the message"`` on one line (orbax errors run over many lines)."""
    return _squash(f"{type(error).__name__}: {error}", limit)


class RestoredRun(NamedTuple):
    """Everything :meth:`RunCheckpointer.restore` gives back for one step."""

    step: int
    train_state: Any  # TrainState with the abstract target's structure and shardings
    teacher_params: Any  # params tree, or None when the step has none
    rng_key: Any  # typed key of the saved impl, raw uint32 key data, or None
    data_state: dict
    config: dict
    extra: dict


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """``jax.ShapeDtypeStruct`` twin of ``tree`` (arrays or abstract leaves), with shardings.

    ``shardings`` is a tree of ``jax.sharding.Sharding`` with ``tree``'s structure or a
    prefix of it (e.g. the ``state_sharding`` of :func:`amrsd_jax.update.make_update_step`,
    or one sharding for everything); ``None`` keeps each leaf's own sharding if it has one.
    """
    def sds(x, sharding):
        if sharding is None:
            sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    if shardings is None:
        return jax.tree.map(lambda x: sds(x, None), tree)
    # shardings may be a prefix: map over it and broadcast each sharding over its subtree
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: sds(x, s), sub), shardings, tree,
                        is_leaf=lambda s: s is None)


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
    """``'embed_tokens/embedding/value' -> shape`` for every leaf of a parameter tree (an
    ``nnx.State`` of arrays or ``ShapeDtypeStruct``s, or orbax's metadata tree of one)."""
    def name(key) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)
    return {"/".join(name(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def parameter_mismatch(saved: dict[str, tuple], expected: dict[str, tuple]) -> str | None:
    """How the saved parameter shapes differ from the expected ones (``None``: they match)."""
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & saved.keys() if expected[k] != saved[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} parameter(s) missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} not in this model (e.g. {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape (e.g. {k}: saved {saved[k]}, "
                     f"expected {expected[k]})")
    return "; ".join(parts) or None


def _check_json(name: str, value: dict) -> dict:
    """Fail at the call site (not in the async writer thread) on non-JSON values."""
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} is not JSON-serialisable: {e}") from e
    return value


def _encode_key(key: Any) -> dict | None:
    """Typed key -> ``{"typed": True, "impl": name, "data": [...]}``; raw uint32 kept raw."""
    if key is None:
        return None
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(key) if typed else key)
    return {"typed": bool(typed), "impl": str(jax.random.key_impl(key)) if typed else None,
            "dtype": str(data.dtype), "shape": list(data.shape),
            "data": data.reshape(-1).tolist()}


def _decode_key(enc: dict | None) -> Any:
    if enc is None:
        return None
    data = np.asarray(enc["data"], dtype=enc["dtype"]).reshape(enc["shape"])
    if enc["typed"]:
        return jax.random.wrap_key_data(data, impl=enc["impl"])
    return jax.numpy.asarray(data)


class RunCheckpointer:
    """Save / restore whole training runs under ``directory`` (one orbax step per save).

    Keeps the newest ``max_to_keep`` complete steps (``None`` keeps all). Not thread-safe;
    use one writing instance per directory per job (orbax's manager is not multi-job safe).
    Anything that only reads a directory another job may be writing (an evaluator, weights
    for evaluation) must pass ``read_only=True``: it never creates, cleans up or deletes.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 2,
                 async_save: bool = True, read_only: bool = False):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        directory = os.fspath(directory)
        self.directory = directory if is_url(directory) else os.path.abspath(directory)
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
            enable_async_checkpointing=async_save,
            # leftovers of a crashed save: never finalized, safe to drop before writing again
            # (but never from a reader: they may be another job's save in progress)
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
            save_interval_steps=0 if read_only else 1,  # orbax warns unless 0 when read-only
        )
        _quiet_orbax_tracebacks()
        self._mngr = ocp.CheckpointManager(self.directory, options=options)
        self._in_flight: int | None = None  # step of an async save not yet committed

    # ------------------------------------------------------------------ queries
    def _pending(self) -> int | None:
        if self._in_flight is not None and not self._mngr.is_saving_in_progress():
            step, self._in_flight = self._in_flight, None
            self._check_write(step, self._mngr.check_for_errors)  # a failed background write
        return self._in_flight

    def _check_write(self, step: int | None, write, *args, **kwargs):
        """``write(*args, **kwargs)``, an error of it as one CheckpointWriteError line."""
        try:
            return write(*args, **kwargs)
        except (OSError, RuntimeError, ValueError) as e:
            which = "a checkpoint" if step is None else f"checkpoint step {step}"
            raise CheckpointWriteError(f"writing {which} to {self.directory} failed "
                                       f"({one_line(e)}); the earlier steps "
                                       f"{self.all_committed()} are intact") from e

    def all_committed(self) -> list[int]:
        """Committed steps on disk, ascending (no check of a save in flight)."""
        return sorted(self._mngr.all_steps())

    def all_steps(self) -> list[int]:
        """Complete (committed) steps, ascending."""
        pending = self._pending()
        return sorted(s for s in self._mngr.all_steps() if s != pending)

    def latest_step(self) -> int | None:
        """Newest complete step, or ``None`` when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------ save
    def save(self, step: int, *, train_state: Any, teacher_params: Any = None, rng_key: Any,
             data_state: dict, config: dict, extra: dict | None = None,
             force: bool = True) -> bool:
        """Write step ``step`` (asynchronously if so configured).

        Returns False (and writes nothing) if ``step`` is already saved, or if ``force`` is
        False and orbax's save policy declines. The arrays are copied before returning, so
        ``train_state`` may be donated to the next update step immediately.
        """
        if self.read_only:
            raise PermissionError(f"RunCheckpointer({self.directory!r}) is read-only")
        step = int(step)
        if step in self._mngr.all_steps():
            log.warning("checkpoint step %d already exists in %s; not overwriting",
                        step, self.directory)
            return False
        run = {"format_version": _FORMAT_VERSION, "step": step,
               "has_teacher": teacher_params is not None, "rng_key": _encode_key(rng_key),
               "extra": _check_json("extra", dict(extra or {}))}
        items = {_STATE: ocp.args.StandardSave(train_state),
                 _DATA: ocp.args.JsonSave(_check_json("data_state", data_state)),
                 _CONFIG: ocp.args.JsonSave(_check_json("config", config)),
                 _RUN: ocp.args.JsonSave(run)}
        if teacher_params is not None:
            items[_TEACHER] = ocp.args.StandardSave(teacher_params)
        self._pending()  # raise now if the previous async save failed
        saved = self._check_write(step, self._mngr.save, step,
                                  args=ocp.args.Composite(**items), force=force)
        if saved and self._mngr.is_saving_in_progress():
            self._in_flight = step
        return saved

    # ------------------------------------------------------------------ restore
    def restore(self, step: int | None = None, *, abstract_train_state: Any,
                abstract_teacher_params: Any = None) -> RestoredRun:
        """Restore ``step`` (default: the latest complete one).

        ``abstract_train_state`` is a tree of ``jax.ShapeDtypeStruct`` with ``.sharding`` set
        (see :func:`abstract_like`); the returned train state has exactly its pytree
        structure, dtypes and shardings. The teacher (if the step has one) is restored into
        ``abstract_teacher_params``, defaulting to ``abstract_train_state.params``; a step
        saved without a teacher gives ``teacher_params=None`` (the caller decides whether to
        rebuild one). Raises ``FileNotFoundError`` (naming the directory) when there is no
        such complete step.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        step = int(step)
        if step == self._pending():
            self.wait_until_finished()
        elif step not in self._mngr.all_steps():
            raise FileNotFoundError(f"no complete checkpoint for step {step} in "
                                    f"{self.directory}; available: {self.all_steps()}")
        run = self._mngr.restore(step, args=ocp.args.Composite(
            **{_RUN: ocp.args.JsonRestore()}))[_RUN]
        self._check_parameters(step, abstract_train_state.params)
        items = {_STATE: ocp.args.StandardRestore(abstract_train_state),
                 _DATA: ocp.args.JsonRestore(), _CONFIG: ocp.args.JsonRestore()}
        if run["has_teacher"]:
            if abstract_teacher_params is None:
                abstract_teacher_params = abstract_train_state.params
            items[_TEACHER] = ocp.args.StandardRestore(abstract_teacher_params)
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        return RestoredRun(step=step, train_state=out[_STATE],
                           teacher_params=out[_TEACHER] if run["has_teacher"] else None,
                           rng_key=_decode_key(run["rng_key"]), data_state=out[_DATA],
                           config=out[_CONFIG], extra=run["extra"])

    def _check_parameters(self, step: int, abstract_params: Any) -> None:
        """Raise :class:`CheckpointMismatch` when ``step`` saved other parameters than
        ``abstract_params`` describes (read from the step's metadata, before any array)."""
        path = epath.Path(self.directory) / str(step) / _STATE
        with ocp.StandardCheckpointer() as reader:  # closed: it owns a background thread
            saved = reader.metadata(path).item_metadata
        diff = parameter_mismatch(_leaf_shapes(saved["params"]), _leaf_shapes(abstract_params))
        if diff:
            raise CheckpointMismatch(
                f"checkpoint step {step} in {self.directory} holds another model's parameters: "
                f"{diff}; resume with the model settings it was saved with (model.name, "
                "model.scan_layers in its config), or start a new run in another output_dir")

    def restore_intact(self, **restore_kwargs) -> tuple[RestoredRun | None, list[DamagedStep]]:
        """:meth:`restore` the newest step that restores, trying older steps past damaged
        ones; returns it (``None`` if no step restores) and the damaged steps, newest first,
        each moved aside to ``<step>.damaged-<time>`` (never deleted), so that later saves
        of those step numbers are not refused."""
        damaged = []
        for step in reversed(self.all_steps()):
            try:
                restored, error = self.restore(step, **restore_kwargs), None
            except CheckpointMismatch:
                raise  # intact, just not this model's: never moved aside
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore/json raise many types
                restored, error = None, one_line(e)
            # on a pod one host's shard may be the damaged one: all restore the same step
            if all_processes(error is None):
                return restored, damaged
            damaged.append(DamagedStep(step, error or "damaged on another process",
                                       self._move_aside(step)))
        return None, damaged

    def _move_aside(self, step: int) -> str | None:
        if self.read_only:
            return None
        target = None
        if jax.process_index() == 0:
            source = epath.Path(self.directory) / str(step)
            target = source.with_name(f"{step}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            source.rename(target)
        barrier(f"amrsd_jax: step {step} moved aside")  # before any process reloads
        self._mngr.reload()  # forget the moved step
        return None if target is None else os.fspath(target)

    # ------------------------------------------------------------------ lifecycle
    def wait_until_finished(self) -> None:
        """Block until the pending async save (if any) is committed; re-raise its error as
        a :class:`CheckpointWriteError`."""
        step, self._in_flight = self._in_flight, None
        self._check_write(step, self._mngr.wait_until_finished)
        self._check_write(step, self._mngr.check_for_errors)

    def close(self) -> None:
        """Wait for pending saves and old-step deletions, then release orbax's resources."""
        step, self._in_flight = self._in_flight, None
        self._check_write(step, self._mngr.close)

    def __enter__(self) -> "RunCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
