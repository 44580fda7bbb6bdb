"""Tokenizer from GGUF metadata, chat templates, left-padded batches."""

from __future__ import annotations

import time

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from amrsd_jax.models import gguf_import as gi
from amrsd_jax.models.tokenizer import (
    apply_chat_template,
    encode_prompts,
    load_tokenizer,
    tokenizer_from_gguf,
)

EXPECTED_SMOLLM_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
)
ROUND_TRIP = [
    "What is 2+3?",
    "12345",
    " leading space",
    "   three leading spaces and trailing  ",
    "line one\nline two\n\n\ttabbed",
    "\n",
    "Unicode: héllo wörld, naïve café — 日本語テキスト, emoji 😀🚀, Ελληνικά",
    "The answer is 42. Compute 3.14159 * 2 = 6.28318!",
    "def f(x):\n    return x ** 2  # code",
    "<|im_start|>user\nhi<|im_end|>\n",
]


# ----------------------------------------------------------------------------- bundled SmolLM2
@pytest.fixture(scope="module")
def smollm_path():
    try:
        return gi.bundled_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(f"bundled SmolLM2 GGUF not available: {e}")


@pytest.fixture(scope="module")
def smollm(smollm_path) -> PreTrainedTokenizerFast:
    return tokenizer_from_gguf(smollm_path)


def test_build_reads_only_metadata(smollm_path, monkeypatch):
    # GGUFReader builds numpy views per vocab entry (seconds); reading a path must avoid it
    def no_reader(*args, **kwargs):
        raise AssertionError("tokenizer_from_gguf(path) must not open a GGUFReader")

    monkeypatch.setattr(gguf.GGUFReader, "__init__", no_reader)
    start = time.perf_counter()
    tok = tokenizer_from_gguf(smollm_path)
    print(f"tokenizer from 98 MB GGUF built in {time.perf_counter() - start:.2f} s")
    assert len(tok) == 49152


def test_smollm_chat_template(smollm):
    text = smollm.apply_chat_template([{"role": "user", "content": "What is 2+3?"}],
                                      add_generation_prompt=True, tokenize=False)
    assert text == EXPECTED_SMOLLM_PROMPT
    assert apply_chat_template(smollm, ["What is 2+3?"]) == [EXPECTED_SMOLLM_PROMPT]


def test_smollm_special_tokens(smollm):
    assert smollm.encode("<|im_start|>", add_special_tokens=False) == [1]
    assert smollm.encode("<|im_end|>", add_special_tokens=False) == [2]
    assert (smollm.bos_token, smollm.bos_token_id) == ("<|im_start|>", 1)
    assert (smollm.eos_token, smollm.eos_token_id) == ("<|im_end|>", 2)
    assert (smollm.pad_token_id, smollm.unk_token) == (2, "<|endoftext|>")
    # add_bos_token is False in the GGUF: encoding adds nothing
    assert smollm("hi")["input_ids"] == smollm("hi", add_special_tokens=False)["input_ids"]
    # control tokens are special: skipped on request, atomic when encoding
    ids = smollm.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert smollm.decode(ids, skip_special_tokens=True) == "user\nhi"
    specials = {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>"}
    assert specials <= set(smollm.all_special_tokens)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_smollm_round_trip(smollm, text):
    ids = smollm.encode(text, add_special_tokens=False)
    assert smollm.decode(ids) == text


def test_smollm_digits_split_individually(smollm):
    ids = smollm.encode("12345", add_special_tokens=False)
    assert len(ids) == 5
    assert smollm.convert_ids_to_tokens(ids) == ["1", "2", "3", "4", "5"]
    assert smollm.convert_ids_to_tokens(smollm.encode(" 2024", add_special_tokens=False)) == \
        ["Ġ", "2", "0", "2", "4"]


def test_smollm_known_ids(smollm):
    """Pinned ids of the rendered prompt (regression guard for vocab/merges/pre-tokenizer)."""
    ids = smollm.encode(EXPECTED_SMOLLM_PROMPT, add_special_tokens=False)
    assert ids == [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28,
                   7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 35,
                   47, 2, 198, 1, 520, 9531, 198]
    tokens = smollm.convert_ids_to_tokens(ids)
    assert tokens[:4] == ["<|im_start|>", "system", "Ċ", "You"]
    assert tokens[-9:] == ["+", "3", "?", "<|im_end|>", "Ċ", "<|im_start|>", "ass", "istant", "Ċ"]


def test_save_and_load_round_trip(smollm, tmp_path):
    smollm.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(tmp_path)
    assert loaded.padding_side == "left" and loaded.pad_token == "<|im_end|>"
    assert loaded.chat_template == smollm.chat_template
    for text in [*ROUND_TRIP, EXPECTED_SMOLLM_PROMPT]:
        expected = smollm.encode(text, add_special_tokens=False)
        assert loaded.encode(text, add_special_tokens=False) == expected
        assert loaded(text)["input_ids"] == smollm(text)["input_ids"]


def test_accepts_reader_and_metadata(smollm, smollm_path):
    meta = gi.read_gguf_metadata(smollm_path)
    from_meta = tokenizer_from_gguf(meta)
    assert from_meta.encode(EXPECTED_SMOLLM_PROMPT) == smollm.encode(EXPECTED_SMOLLM_PROMPT)


# ----------------------------------------------------------------------------- tiny tokenizer
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(digits: bool = True) -> PreTrainedTokenizerFast:
    """A ~300-token byte-level BPE trained in-test (SmolLM-style digit split by default)."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    digit_split = pre_tokenizers.Digits(individual_digits=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([digit_split, byte_level]) if digits else byte_level
    tok.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog 12 times.",
              "What is 2+3? It is 5. What is 10+20? It is 30.",
              "Answer carefully, then verify: 144 = 12 * 12."] * 5
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                 eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                 pad_token="<|im_end|>", chat_template=CHATML)
    hf.add_tokens(["<think>"])  # a user-defined (non-special) added token
    return hf


def _tiny_gguf(tmp_path, tokenizer):
    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 32,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "head_dim": 16, "vocab_size": len(tokenizer)}
    state = {"model.embed_tokens.weight": np.ones((len(tokenizer), 32), np.float32),
             "model.norm.weight": np.ones(32, np.float32)}
    return gi.write_gguf_from_hf(state, cfg, tokenizer, tmp_path / "tiny.gguf")


@pytest.mark.parametrize("digits", [True, False])
def test_tiny_tokenizer_survives_gguf(digits, tmp_path):
    original = tiny_tokenizer(digits)
    path = _tiny_gguf(tmp_path, original)
    assert gi.read_gguf_metadata(path)["tokenizer.ggml.pre"] == ("smollm" if digits else "gpt-2")
    for rebuilt in (tokenizer_from_gguf(path), tokenizer_from_gguf(gguf.GGUFReader(path))):
        assert len(rebuilt) == len(original)
        assert rebuilt.get_vocab() == original.get_vocab()
        assert rebuilt.chat_template == original.chat_template
        assert (rebuilt.bos_token_id, rebuilt.eos_token_id, rebuilt.pad_token_id) == (1, 2, 2)
        for text in [*ROUND_TRIP, "x <think> y", "2024-12-31"]:
            ids = original.encode(text, add_special_tokens=False)
            assert rebuilt.encode(text, add_special_tokens=False) == ids, text
            assert rebuilt.decode(ids) == text
        assert rebuilt.convert_tokens_to_ids("<think>") in rebuilt.get_added_vocab().values()
        assert "<think>" not in rebuilt.all_special_tokens
    if digits:
        assert len(tokenizer_from_gguf(path).encode("12345", add_special_tokens=False)) == 5


def test_unsupported_tokenizer_model():
    with pytest.raises(NotImplementedError, match="gpt2"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})


def test_unknown_pre_tokenizer_warns():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
            "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.warns(UserWarning, match="llama-bpe"):
        tok = tokenizer_from_gguf(meta)
    assert tok.encode("ab") == [2]


def test_add_bos_token_respected():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": ["<s>", "a", "b", "ab"], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.token_type": [3, 1, 1, 1], "tokenizer.ggml.bos_token_id": 0,
            "tokenizer.ggml.add_bos_token": True}
    tok = tokenizer_from_gguf(meta)
    assert tok.encode("ab") == [0, 3]
    assert tok.encode("ab", add_special_tokens=False) == [3]


# ----------------------------------------------------------------------------- templates & batches
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> PreTrainedTokenizerFast:
    directory = tmp_path_factory.mktemp("tiny_tok")
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(str(directory))
    return load_tokenizer(directory)


def test_load_tokenizer_defaults(tiny, tmp_path):
    assert tiny.padding_side == "left"
    assert tiny.pad_token == tiny.eos_token == "<|im_end|>"
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


def test_apply_chat_template_forms(tiny):
    plain = apply_chat_template(tiny, ["hi", "What is 2+3?"])
    assert plain == ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
                     "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"]
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"}]
    assert apply_chat_template(tiny, [conv]) == [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
        "<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n"]
    with_system = apply_chat_template(tiny, ["hi"], system_prompt="Be brief.")
    assert with_system == ["<|im_start|>system\nBe brief.<|im_end|>\n"
                           "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    with pytest.raises(ValueError, match="system"):
        conv = [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]
        apply_chat_template(tiny, [conv], system_prompt="Be brief.")


def test_apply_chat_template_system_prompt_smollm(smollm):
    out = apply_chat_template(smollm, ["What is 2+3?"], system_prompt="Think step by step.")
    assert out == ["<|im_start|>system\nThink step by step.<|im_end|>\n"
                   "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"]


def test_apply_chat_template_requires_template(tiny):
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        apply_chat_template(tok, ["hi"])


def test_encode_prompts_left_pads(tiny):
    texts = apply_chat_template(tiny, ["hi", "What is 2+3? Answer with 12345."])
    batch = encode_prompts(tiny, texts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape
    lengths = [len(tiny.encode(t, add_special_tokens=False)) for t in texts]
    assert ids.shape == (2, max(lengths))
    for b, n in enumerate(lengths):
        assert mask[b].tolist() == [0] * (ids.shape[1] - n) + [1] * n
        assert (ids[b, : ids.shape[1] - n] == tiny.pad_token_id).all()
        assert ids[b, -n:].tolist() == tiny.encode(texts[b], add_special_tokens=False)
        assert ids[b, -n] == tiny.convert_tokens_to_ids("<|im_start|>")  # no extra BOS
    assert (ids[:, -1] == ids[0, -1]).all()  # every row ends with the generation prompt


def test_encode_prompts_max_length(tiny):
    texts = apply_chat_template(tiny, ["hi", "What is 2+3? Answer with 12345."])
    full = [tiny.encode(t, add_special_tokens=False) for t in texts]
    width = len(full[0]) + 2  # longer than the first prompt, shorter than the second
    batch = encode_prompts(tiny, texts, max_length=width)
    assert batch["input_ids"].shape == (2, width)
    assert batch["input_ids"][0, 2:].tolist() == full[0]
    assert batch["attention_mask"][0].tolist() == [0, 0] + [1] * len(full[0])
    assert batch["input_ids"][1].tolist() == full[1][-width:]  # truncated on the left
    assert batch["attention_mask"][1].all()
    assert encode_prompts(tiny, texts, max_length=64)["input_ids"].shape == (2, 64)


def test_encode_prompts_edge_cases(tiny):
    empty = encode_prompts(tiny, [])
    assert empty["input_ids"].shape == (0, 0) and empty["input_ids"].dtype == np.int32
    blank = encode_prompts(tiny, ["", "a"])
    assert blank["attention_mask"].tolist() == [[0], [1]]
    with pytest.raises(TypeError):
        encode_prompts(tiny, "not a list")
    with pytest.raises(ValueError):
        encode_prompts(tiny, ["a"], max_length=0)
