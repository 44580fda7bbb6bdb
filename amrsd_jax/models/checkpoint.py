"""Hugging Face safetensors checkpoints <-> :class:`~amrsd_jax.models.decoder.Decoder`.

Loading builds the model abstractly (no memory), then creates every parameter directly in
its final sharding with ``jax.make_array_from_callback``: each device reads only its own
slice from the memory-mapped safetensors file, so an 8B checkpoint never has to fit on one
device or be copied whole through the host.

Scanned layers (``DecoderConfig.scan_layers``) hold each layer parameter as ONE array
``[layers, ...]`` at the path ``('layers', 'self_attn', 'q_proj', 'kernel')``; Hugging Face
files hold ``model.layers.{i}.self_attn.q_proj.weight`` per layer. :func:`hf_tensor_names`
maps a path to its file tensors (one per layer for a stacked path), :func:`hf_name` a path
and a layer index to one tensor name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ..sharding import DEFAULT_RULES, single_device_mesh, state_shardings
from .config import DecoderConfig
from .decoder import Decoder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# tensors some exporters write that carry no learned state
IGNORED_KEYS = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message says what to fix."""


def is_stacked(path: tuple) -> bool:
    """Whether an NNX state path is a scanned layer parameter ``('layers', 'mlp', ...)``
    (stacked ``[layers, ...]``) rather than ``('layers', 3, 'mlp', ...)`` or a global one."""
    return str(path[0]) == "layers" and not isinstance(path[1], int)


def hf_name(path: tuple, layer: int | None = None) -> tuple[str, bool]:
    """Hugging Face tensor name for an NNX state path, and whether it is transposed.

    ``('layers', 3, 'self_attn', 'q_proj', 'kernel')`` or the stacked path
    ``('layers', 'self_attn', 'q_proj', 'kernel')`` with ``layer=3`` ->
    ``('model.layers.3.self_attn.q_proj.weight', True)``: NNX kernels are ``[in, out]``,
    Hugging Face (PyTorch) weights ``[out, in]``.
    """
    parts = [str(p) for p in path]
    if is_stacked(path):
        if layer is None:
            raise ValueError(f"stacked layer parameter {'.'.join(parts)} needs a layer index")
        parts = [parts[0], str(layer)] + parts[1:]
    leaf = parts[-1]
    if parts[0] == "lm_head":
        return "lm_head.weight", True
    if leaf == "embedding":
        return "model.embed_tokens.weight", False
    transpose = leaf == "kernel"
    suffix = {"kernel": "weight", "bias": "bias", "weight": "weight"}[leaf]
    return "model." + ".".join(parts[:-1] + [suffix]), transpose


def hf_tensor_names(path: tuple, num_layers: int) -> tuple[list[str], bool]:
    """The Hugging Face tensors behind one NNX parameter: one name, or ``num_layers`` names
    (layer order) for a stacked parameter; and whether each is transposed."""
    if not is_stacked(path):
        name, transpose = hf_name(path)
        return [name], transpose
    names = [hf_name(path, i) for i in range(num_layers)]
    return [n for n, _ in names], names[0][1]


def _abstract_model(cfg: DecoderConfig) -> nnx.Module:
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


# ---------------------------------------------------------------------------- reading
class _TensorIndex:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.directory = directory
        index = directory / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from e
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE_FILE).exists():
            files, weight_map = [SINGLE_FILE], None
        else:
            raise CheckpointError(
                f"no weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE} with its "
                "shards (a Hugging Face checkpoint saved with safe_serialization=True)")
        self.handles = {}
        for name in files:
            f = directory / name
            if not f.exists():
                raise CheckpointError(f"checkpoint shard {f} listed in {INDEX_FILE} is missing")
            try:
                self.handles[name] = safe_open(str(f), framework="numpy")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(
                    f"cannot read {f}: {e} (truncated or corrupt file? re-download or "
                    "re-export the checkpoint)") from e
        if weight_map is None:
            weight_map = {k: SINGLE_FILE for k in self.handles[SINGLE_FILE].keys()}
        self.weight_map = weight_map

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handles[self.weight_map[key]].get_slice(key).get_shape())

    def read(self, key: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        sl = self.handles[self.weight_map[key]].get_slice(key)
        return sl[index] if index is not None else sl[:]


def load_checkpoint(path: str | os.PathLike, *, dtype: str = "float32",
                    param_dtype: str | None = None, remat_policy: str = "none",
                    scan_layers: bool = True, mesh: Mesh | None = None,
                    rules=None) -> Decoder:
    """Load a local Hugging Face checkpoint directory into a :class:`Decoder`.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` or sharded
        ``model-0000x-of-0000y.safetensors`` plus ``model.safetensors.index.json``.
      dtype / param_dtype: compute and storage dtypes (``float32`` or ``bfloat16``).
      remat_policy / scan_layers: see :class:`DecoderConfig` (the files are the same for
        either layer layout).
      mesh: place parameters on this mesh following ``rules`` (default: first device).
    """
    directory = Path(path)
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory} has no config.json: not a Hugging Face checkpoint "
                              "directory")
    cfg = DecoderConfig.from_pretrained(directory, dtype=dtype, param_dtype=param_dtype,
                                        remat_policy=remat_policy, scan_layers=scan_layers)
    tensors = _TensorIndex(directory)
    mesh = mesh or single_device_mesh()
    abstract = _abstract_model(cfg)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules or DEFAULT_RULES)
    flat_shardings = dict(nnx.to_flat_state(shardings))

    missing, mismatched = [], []
    loaded = []
    for path_, var in nnx.to_flat_state(abstract_state):
        names, transpose = hf_tensor_names(path_, cfg.num_layers)
        absent = [n for n in names if n not in tensors.keys()]
        if absent:
            missing += absent
            continue
        want = tuple(var.shape)[1:] if is_stacked(path_) else tuple(var.shape)
        bad = [(n, tensors.shape(n)) for n in names
               if (tensors.shape(n)[::-1] if transpose else tensors.shape(n)) != want]
        if bad:
            mismatched += [f"{n}: checkpoint {have}, config expects "
                           f"{want[::-1] if transpose else want}" for n, have in bad]
            continue
        loaded.append((path_, var, names, transpose))
    if missing or mismatched:
        msg = [f"checkpoint {directory} does not match its config.json:"]
        if missing:
            msg.append(f"  missing tensors ({len(missing)}): {', '.join(missing[:5])}"
                       + (" ..." if len(missing) > 5 else ""))
        if mismatched:
            msg.append("  shape mismatches: " + "; ".join(mismatched[:5]))
        raise CheckpointError("\n".join(msg))

    np_dtype = jnp.dtype(cfg.param_dtype)
    values = {}
    for path_, var, names, transpose in loaded:
        sharding = flat_shardings[path_]
        sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding

        def read_one(name, index, transpose=transpose):
            # `index` is this device's slice of OUR layout; map it to the file's layout
            if transpose:
                return tensors.read(name, index[::-1]).T.astype(np_dtype)
            return tensors.read(name, index).astype(np_dtype)

        if is_stacked(path_):
            def read(index, names=names, read_one=read_one):
                # the layer axis comes first: stack this device's layers' slices
                return np.stack([read_one(names[i], tuple(index[1:]))
                                 for i in range(len(names))[index[0]]])
        else:
            def read(index, name=names[0], read_one=read_one):
                return read_one(name, index)

        values[path_] = jax.make_array_from_callback(tuple(var.shape), sharding, read)
    state = nnx.from_flat_state([(p, abstract_state_leaf.replace(values[p]))
                                 for p, abstract_state_leaf in nnx.to_flat_state(abstract_state)])
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------- writing
def model_state_dict(model: Decoder) -> dict[str, np.ndarray]:
    """All parameters as a Hugging Face-named dict of host numpy arrays."""
    out = {}
    num_layers = model.config.num_layers
    for path_, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names, transpose = hf_tensor_names(path_, num_layers)
        value = np.asarray(jax.device_get(var[...]))
        # a stacked parameter is one tensor per layer in the file
        for name, v in zip(names, value if is_stacked(path_) else [value]):
            out[name] = np.ascontiguousarray(v.T if transpose else v)
    return out


def save_checkpoint(model: Decoder, directory: str | os.PathLike, *, tokenizer=None,
                    max_shard_size: int | str | None = None) -> Path:
    """Write ``model`` as a Hugging Face checkpoint (``config.json`` + safetensors).

    With ``max_shard_size`` the weights are split into ``model-0000x-of-0000y.safetensors``
    files plus ``model.safetensors.index.json``, as ``transformers`` does.
    """
    from huggingface_hub.serialization import split_state_dict_into_shards_factory
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg: DecoderConfig = model.config
    (directory / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    tensors = model_state_dict(model)
    if max_shard_size is None:
        save_file(tensors, str(directory / SINGLE_FILE), metadata={"format": "pt"})
    else:
        split = split_state_dict_into_shards_factory(
            tensors, get_storage_size=lambda a: a.nbytes, max_shard_size=max_shard_size,
            filename_pattern="model{suffix}.safetensors")
        for filename, names in split.filename_to_tensors.items():
            save_file({n: tensors[n] for n in names}, str(directory / filename),
                      metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
                     "weight_map": split.tensor_to_filename}
            (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory
