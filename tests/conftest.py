"""Shared test set-up: 8 fake CPU devices and tiny random models (no downloads)."""

import os

# must precede the first `import jax` anywhere in the test session
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def library_methods() -> list[str]:
    """The methods the library ships (not ones a test file registers), sorted."""
    from amrsd_jax.methods import METHODS

    return sorted(n for n, cls in METHODS.items() if cls.__module__.startswith("amrsd_jax."))


def tiny_config(model_type="llama", **overrides):
    from amrsd_jax.models import DecoderConfig

    base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, model_type=model_type, eos_token_id=3,
                pad_token_id=0, bos_token_id=1, max_position_embeddings=256)
    base.update(overrides)
    return DecoderConfig(**base)


def tiny_model(model_type="llama", seed=0, **overrides):
    from flax import nnx

    from amrsd_jax.models import Decoder

    return Decoder(tiny_config(model_type, **overrides), rngs=nnx.Rngs(seed))


FAMILIES = [
    pytest.param(dict(model_type="llama"), id="llama"),
    pytest.param(dict(model_type="llama", tie_word_embeddings=True,
                      rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0),
                                    ("low_freq_factor", 1.0),
                                    ("original_max_position_embeddings", 16),
                                    ("rope_type", "llama3"))), id="llama3-tied"),
    pytest.param(dict(model_type="qwen2"), id="qwen2"),
    pytest.param(dict(model_type="qwen3", tie_word_embeddings=True), id="qwen3"),
]


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_chat_tokenizer(vocab_size: int = 320):
    """A byte-level BPE with a ChatML template, trained in-test (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = ["What is 2 + 3? Give the final answer after 'Answer:'. Answer: 5",
              "Tom has 4 apples and buys 3 more. How many apples? Hint: add them. Critique"] * 5
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                   pad_token="<|im_end|>", chat_template=CHATML,
                                   padding_side="left")


def write_tiny_checkpoint(directory, model_type="llama", seed=0, **overrides):
    """A tiny random HF-layout checkpoint with a chat tokenizer; returns the directory."""
    from amrsd_jax.models.checkpoint import save_checkpoint

    tok = tiny_chat_tokenizer()
    eos = tok.eos_token_id
    model = tiny_model(model_type, seed, vocab_size=len(tok), eos_token_id=eos,
                       pad_token_id=eos, bos_token_id=tok.bos_token_id, **overrides)
    save_checkpoint(model, directory, tokenizer=tok)
    return directory


def _register_test_rewards():
    from amrsd_jax.rewards import VerifierResult, register_reward

    @register_reward("test_even_length", overwrite=True)
    def even_length(response, gold, **kw):
        """Mixed outcomes from a random model, with an answer span so OAR has something to
        do (``reward.name=test_even_length`` in trainer tests)."""
        ok = len(response) % 2 == 0
        span = (0, min(3, len(response))) if response else None
        return VerifierResult(float(ok), ok, response[:3] or None, span,
                              "correct" if ok else "wrong value")


_register_test_rewards()


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent XLA compilation cache for one test module: each Trainer builds fresh
    jitted closures, and the cache lets later trainers reuse earlier ones' programs
    (``pytestmark = pytest.mark.usefixtures("compilation_cache")``)."""
    import jax

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for n, v in old.items():
        jax.config.update(n, v)
