"""Shared test set-up: 8 fake CPU devices and tiny random models (no downloads)."""

import atexit
import os
import shutil
import tempfile

# The tests' programs are tiny: compiling them costs far more than running them, so XLA's
# CPU backend skips LLVM's optimisations and uses its older, quicker fusion code generator
# (measured: -38% CPU on the update-step and checkpoint tests for the first two flags; one
# tiny 8-device training run's trainer, 21.7 -> 12.7 CPU s for the third). Sharding, and the
# programs' results to the tests' tolerances, are unchanged; processes the tests start get
# the same flags (``XLA_FLAGS`` below, or :data:`FAST_COMPILE_FLAGS`).
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                      " --xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a test process with ``devices`` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}"


# must precede the first `import jax` anywhere in the test session
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One persistent XLA compilation cache for the session: this process and every process a
# test starts (they inherit the environment). Trainers build fresh jitted closures and many
# tests run the same tiny programs, so each is compiled once. A module that counts
# compilations turns it off (``no_compilation_cache``).
XLA_CACHE_DIR = tempfile.mkdtemp(prefix="amrsd-tests-xla-cache-")
atexit.register(shutil.rmtree, XLA_CACHE_DIR, True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", XLA_CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

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


def abstract_train_state(model, optimizer, state_shardings):
    """The update step's train state of ``model`` as shapes carrying ``state_shardings``
    (for ``lower().compile()`` without allocating anything)."""
    import jax

    from amrsd_jax.update import init_train_state

    state = jax.eval_shape(lambda: init_train_state(model, optimizer))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                        state_shardings)


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
def no_compilation_cache():
    """The session's persistent compilation cache off for one module: a cache hit is not a
    compilation, so a module that counts compilations must not see one."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # JAX decides once per process whether the cache is used
    yield
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.reset_cache()
