"""A trained run as a model: its saved config, its latest weights, and a Hugging Face export.

A *run directory* is a trainer's ``output_dir``: ``config.json`` (the run's
:class:`~amrsd_jax.train.config.TrainConfig`) and ``checkpoints/<step>/`` (orbax). Its
policy is the base model the config names (``model.name``, with its tokenizer and chat
template) with the parameters of one checkpoint step. :func:`export_hf_checkpoint` writes
that policy as a Hugging Face checkpoint directory (``config.json``, ``model.safetensors``,
tokenizer files with the chat template, ``generation_config.json``) that
``transformers.AutoModelForCausalLM`` and our own :func:`~amrsd_jax.models.load_model` load.

Tensor names come from :func:`~amrsd_jax.models.checkpoint.model_state_dict`, the inverse of
the loader's mapping, so export and load cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from ..rollout.sampler import resolve_pad_id, resolve_stop_ids
from ..train.checkpoint import RunCheckpointer, abstract_like
from ..train.config import TrainConfig, load_train_config
from ..update import TrainState, make_optimizer
from . import load_model
from .checkpoint import CheckpointError, save_checkpoint
from .decoder import Decoder

__all__ = ["RUN_CONFIG", "TrainedPolicy", "check_export_target", "export_hf_checkpoint",
           "find_run_dir", "load_run_config", "load_trained_policy"]

RUN_CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
EXPORT_INFO = "amrsd_export.json"  # provenance of an exported checkpoint (run, step, method)


@dataclasses.dataclass
class TrainedPolicy:
    """The policy of one checkpoint step of a run."""

    model: Decoder
    tokenizer: object  # a transformers fast tokenizer with the base model's chat template
    step: int
    config: TrainConfig
    run_dir: Path

    def describe(self) -> str:
        return (f"{self.run_dir} at step {self.step} ({self.config.method} on "
                f"{self.config.model.name})")


def find_run_dir(path: str | os.PathLike) -> Path | None:
    """The run directory ``path`` names (the run itself or its ``checkpoints`` folder), or
    ``None`` when it is not one (e.g. a Hugging Face checkpoint directory)."""
    path = Path(path).expanduser()
    if path.name == CHECKPOINTS and (path.parent / RUN_CONFIG).is_file():
        path = path.parent
    if (path / CHECKPOINTS).is_dir() and (path / RUN_CONFIG).is_file():
        return path
    return None


def _require_run_dir(path: str | os.PathLike) -> Path:
    run_dir = find_run_dir(path)
    if run_dir is None:
        raise CheckpointError(
            f"{path} is not a training run directory: expected {RUN_CONFIG} and "
            f"{CHECKPOINTS}/ (the output_dir of `run.py train`)")
    return run_dir


def load_run_config(run_dir: str | os.PathLike, overrides=()) -> TrainConfig:
    """The run's own config (``<run>/config.json``) with ``key=value`` overrides applied;
    ``output_dir`` is the run directory as found now (it may have been moved)."""
    run_dir = _require_run_dir(run_dir)
    # JSON is YAML: the same loader, checks and override syntax as a YAML config
    return load_train_config(run_dir / RUN_CONFIG, [f"output_dir={run_dir}", *overrides])


def load_trained_policy(run_dir: str | os.PathLike, *, step: int | None = None,
                        dtype: str | None = None, overrides=()) -> TrainedPolicy:
    """Load the run's base model and tokenizer, then the parameters of checkpoint ``step``
    (default: the latest complete one).

    ``dtype`` is the compute dtype (default: the run's); parameters keep the dtype they were
    trained in. Only the parameters are kept: the optimizer state is restored into abstract
    shapes of the run's own optimizer and dropped.
    """
    run_dir = _require_run_dir(run_dir)
    config = load_run_config(run_dir, overrides)
    m = config.model
    # the run's own parameter layout (stacked layers or not), or orbax cannot restore into it
    model, tokenizer = load_model(m.name, dtype or m.dtype, param_dtype=m.param_dtype or m.dtype,
                                  scan_layers=m.scan_layers)
    params = nnx.state(model, nnx.Param)
    optimizer = make_optimizer(config.optimizer)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = abstract_like(TrainState(params, jax.eval_shape(optimizer.init, params),
                                        jax.ShapeDtypeStruct((), jnp.int32)), sharding)
    checkpointer = RunCheckpointer(run_dir / CHECKPOINTS, async_save=False, read_only=True)
    try:
        restored = checkpointer.restore(step, abstract_train_state=abstract)
    finally:
        checkpointer.close()
    nnx.update(model, restored.train_state.params)
    return TrainedPolicy(model, tokenizer, restored.step, config, run_dir)


def check_export_target(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` if an export may write there: never into an existing checkpoint."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory")
    return out


def export_hf_checkpoint(policy: TrainedPolicy, out_dir: str | os.PathLike) -> Path:
    """Write ``policy`` as a Hugging Face checkpoint directory and return it."""
    from transformers import GenerationConfig  # lazy: the auto classes cost seconds

    out = check_export_target(out_dir)
    save_checkpoint(policy.model, out, tokenizer=policy.tokenizer)
    # transformers' generate() then stops where our sampler stops (e.g. at <|im_end|>)
    stops = [int(i) for i in resolve_stop_ids(policy.tokenizer, policy.model.config)]
    GenerationConfig(bos_token_id=policy.model.config.bos_token_id, eos_token_id=stops,
                     pad_token_id=resolve_pad_id(policy.tokenizer)).save_pretrained(str(out))
    (out / EXPORT_INFO).write_text(json.dumps(
        {"run_dir": str(policy.run_dir.resolve()), "step": policy.step,
         "method": policy.config.method, "base_model": policy.config.model.name}, indent=2))
    return out
