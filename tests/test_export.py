"""A trained run used as a model: ``eval --checkpoint RUN`` and ``generate --model RUN`` use
the run's own config and say which step; ``export RUN OUT`` writes a Hugging Face checkpoint
that our loader and ``transformers`` load back to the same parameters and logits.

The run is built without training: a tiny base checkpoint, the run's ``config.json`` as the
trainer writes it, and one orbax checkpoint at step 7 whose parameters differ from the base
(so a loader that silently falls back to the base model fails).
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from amrsd_jax.cli import main
from amrsd_jax.models import load_checkpoint, load_model, model_state_dict
from amrsd_jax.models.export import find_run_dir, load_trained_policy
from amrsd_jax.train.checkpoint import RunCheckpointer
from amrsd_jax.train.config import load_train_config
from amrsd_jax.update import init_train_state, make_optimizer

from conftest import write_tiny_checkpoint

STEP = 7
EVAL_SIZE = 3  # the quickstart evaluates 32 questions: 3 proves the run's config was used


def _make_run(root, model_type="llama", overrides=(), **model_overrides):
    """(run_dir, trained state dict in HF names)."""
    base = write_tiny_checkpoint(root / "base", model_type=model_type, **model_overrides)
    run = root / "run"
    config = load_train_config(None, [
        f"model.name={base}", "method=grpo", f"output_dir={run}", "steps=10",
        "rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.max_new_tokens=4",
        "data.source=arithmetic", "data.level=[1]", f"data.eval_size={EVAL_SIZE}",
        "eval.num_samples=1", "eval.max_new_tokens=4", "eval.batch_size=8",
        "tensorboard=false", "progress=false", *overrides])
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    model, _ = load_model(base, scan_layers=config.model.scan_layers)  # the run's layout
    params = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(0)
    trained = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype),
                           params)
    state = init_train_state(model, make_optimizer(config.optimizer))._replace(
        params=trained, step=jax.numpy.int32(STEP))
    with RunCheckpointer(run / "checkpoints", async_save=False) as ckpt:
        ckpt.save(STEP, train_state=state, rng_key=jax.random.key(0), data_state={},
                  config=config.to_dict())
    nnx.update(model, trained)
    return run, model_state_dict(model)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("export_run"))


def _assert_same_state(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_find_run_dir(run, tmp_path):
    run_dir, _ = run
    assert find_run_dir(run_dir) == run_dir
    assert find_run_dir(run_dir / "checkpoints") == run_dir
    assert find_run_dir(write_tiny_checkpoint(tmp_path / "hf")) is None  # an HF checkpoint


def test_trained_policy_has_the_checkpoint_weights_not_the_base(run):
    run_dir, trained = run
    policy = load_trained_policy(run_dir)
    assert policy.step == STEP
    assert policy.config.method == "grpo" and policy.config.data.eval_size == EVAL_SIZE
    _assert_same_state(model_state_dict(policy.model), trained)
    assert policy.tokenizer.chat_template


@pytest.mark.parametrize("scan_layers", [True, False])
def test_trained_policy_keeps_the_runs_layer_layout(tmp_path, scan_layers):
    run_dir, trained = _make_run(tmp_path, overrides=[f"model.scan_layers={scan_layers}"])
    policy = load_trained_policy(run_dir)
    assert policy.model.config.scan_layers == scan_layers
    _assert_same_state(model_state_dict(policy.model), trained)


def test_export_round_trips_through_our_loader(run, tmp_path, capsys):
    run_dir, trained = run
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), str(out)]) == 0
    assert "step 7" in capsys.readouterr().err
    _assert_same_state(model_state_dict(load_checkpoint(out)), trained)
    model, tokenizer = load_model(out)  # requires the chat template
    assert tokenizer.chat_template
    info = json.loads((out / "amrsd_export.json").read_text())
    assert info["step"] == STEP and info["method"] == "grpo"
    # never writes into an existing checkpoint: a one-line error, exit code 2
    assert main(["export", str(run_dir), str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.parametrize("family", [dict(model_type="llama"),
                                    dict(model_type="qwen3", tie_word_embeddings=True)],
                         ids=["llama", "qwen3-tied"])
def test_export_gives_transformers_the_same_logits(tmp_path, family):
    torch = pytest.importorskip("torch")
    import transformers

    run_dir, _ = _make_run(tmp_path, **family)
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), str(out)]) == 0
    ours = load_trained_policy(run_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    chat = [{"role": "user", "content": "What is 2 + 3?"}]
    text = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == ours.tokenizer.apply_chat_template(chat, add_generation_prompt=True,
                                                      tokenize=False)
    ids = np.asarray([hf_tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    got = np.asarray(ours.model(ids, np.ones_like(ids)))
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)
    assert hf.generation_config.eos_token_id in (hf_tok.eos_token_id, [hf_tok.eos_token_id])


def test_eval_checkpoint_uses_the_runs_config_and_says_the_step(run, tmp_path, monkeypatch,
                                                                 capsys):
    run_dir, _ = run
    monkeypatch.chdir(tmp_path)  # no configs/ here: nothing may fall back to the quickstart
    assert main(["eval", "--checkpoint", str(run_dir), "--out", "m.json"]) == 0
    err = capsys.readouterr().err
    assert f"{run_dir} at step {STEP}" in err
    assert str(run_dir / "config.json") in err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_questions"] == EVAL_SIZE
    lines = [json.loads(x) for x in (run_dir / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in lines] == [("eval", STEP)]


def test_generate_from_a_run_uses_its_policy(run, capsys):
    run_dir, _ = run
    assert main(["generate", "--model", str(run_dir), "--prompt", "What is 2 + 3?",
                 "--max-new-tokens", "3", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert f"at step {STEP}" in err


def test_generate_rejects_impossible_lengths(run, capsys):
    run_dir, _ = run
    with pytest.raises(SystemExit) as e:
        main(["generate", "--num-samples", "0"])
    assert e.value.code == 2 and "--num-samples: must be >= 1" in capsys.readouterr().err
    # the tiny model's context is 256 tokens
    assert main(["generate", "--model", str(run_dir), "--max-new-tokens", "300"]) == 2
    assert "exceeds the model's context of 256" in capsys.readouterr().err


def test_eval_with_a_config_of_another_model_fails_in_one_line(run, tmp_path, capsys):
    """`--config` naming another model: one line that says what does not fit and what to
    do, not orbax's tree diff."""
    run_dir, _ = run
    other = write_tiny_checkpoint(tmp_path / "other", intermediate_size=128)
    rc = main(["eval", "--checkpoint", str(run_dir), "--config", str(run_dir / "config.json"),
               f"model.name={other}"])
    assert rc != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "does not fit" in err[-1] and "leave out --config" in err[-1]
    assert len(err[-1]) < 400
