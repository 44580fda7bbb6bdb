"""AOT memory check (``run.py train --dry-run``): architecture presets, the TPU configs, and a
dry run of a tiny model on the 8 fake CPU devices (no weights allocated)."""

import json
from pathlib import Path

import jax
import pytest

from amrsd_jax.config import ConfigError
from amrsd_jax.models import presets
from amrsd_jax.train import aot
from amrsd_jax.train.config import check_mesh, load_train_config

from conftest import library_methods, tiny_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TPU_CONFIGS = {"tpu_qwen2.5-math-1.5b_gsm8k_v5e-8.yaml": (8, "qwen2.5-math-1.5b-instruct"),
               "tpu_qwen3-8b_math_v4-32.yaml": (16, "qwen3-8b")}


def test_presets_have_the_published_sizes():
    # parameter counts of the public checkpoints (tied embeddings counted once)
    counts = {"qwen2.5-math-1.5b": 1_543_714_304, "qwen2.5-math-1.5b-instruct": 1_543_714_304,
              "qwen3-8b": 8_190_735_360, "smollm2-135m-instruct": 134_515_008}
    for name, n in counts.items():
        assert presets.architecture_config(name).num_params() == n, name
    q3 = presets.architecture_config("Qwen3-8B", dtype="bfloat16")
    assert (q3.qk_norm, q3.attention_bias, q3.tie_word_embeddings, q3.head_dim) == \
        (True, False, False, 128)
    assert q3.dtype == "bfloat16"
    q25 = presets.architecture_config("qwen2.5-math-1.5b-instruct")
    assert (q25.attention_bias, q25.tie_word_embeddings, q25.rope_theta,
            q25.max_position_embeddings, q25.eos_token_id) == (True, True, 10000.0, 4096, 151645)
    with pytest.raises(ValueError, match="presets: qwen2.5-math-1.5b"):
        presets.architecture_config("llama-7b")


def test_local_config_json_wins_over_presets(tmp_path):
    d = tmp_path / "Qwen3-8B"  # named like a preset, but its config.json is what counts
    d.mkdir()
    (d / "config.json").write_text(json.dumps(tiny_config().to_hf_dict()))
    cfg, source = aot.resolve_architecture(str(d))
    assert cfg.hidden_size == 32 and source.endswith("config.json")


def test_architecture_falls_back_to_the_preset_named_in_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "Qwen2.5-Math-1.5B-Instruct"
    cfg, source = aot.resolve_architecture(str(missing), dtype="bfloat16",
                                          remat_policy="full")
    assert cfg == presets.architecture_config("qwen2.5-math-1.5b-instruct", dtype="bfloat16",
                                              remat_policy="full")
    assert "'qwen2.5-math-1.5b-instruct'" in source and "does not exist" in source
    assert aot.resolve_architecture("Qwen/Qwen3-8B-Base")[0].num_layers == 36
    assert presets.match_preset("/ckpt/qwen2.5-math-1.5b/") == "qwen2.5-math-1.5b"
    with pytest.raises(ValueError, match="no architecture preset name.*presets: qwen2.5"):
        aot.resolve_architecture(str(tmp_path / "Mistral-7B"))


@pytest.mark.parametrize("name", sorted(TPU_CONFIGS))
def test_tpu_configs_load_and_match_their_slice(name):
    devices, preset = TPU_CONFIGS[name]
    cfg = load_train_config(CONFIGS / name)
    data, fsdp, tensor = check_mesh(cfg, devices)
    assert data * fsdp * tensor == devices
    assert cfg.model.dtype == "bfloat16" and cfg.model.param_dtype == "float32"
    assert cfg.model.remat_policy == "full" and cfg.vocab_chunk and cfg.data.source == "tfds"
    assert not Path(cfg.model.name).exists()  # a placeholder: the dry run uses the preset
    assert aot.resolve_architecture(cfg.model.name)[1].startswith(f"built-in preset '{preset}'")
    budget, source = aot.hbm_budget(hint=name)
    assert budget == (16.0 if "v5e" in name else 32.0) and name in source


def test_tpu_config_data_fields():
    gsm = load_train_config(CONFIGS / "tpu_qwen2.5-math-1.5b_gsm8k_v5e-8.yaml").data
    assert (gsm.tfds_name, gsm.question_field, gsm.answer_field, gsm.answer_from_solution) == \
        ("gsm8k", "question", "answer", True)
    math = load_train_config(CONFIGS / "tpu_qwen3-8b_math_v4-32.yaml").data
    assert (math.question_field, math.solution_field) == ("problem", "solution")
    assert math.has_reference_solutions


@pytest.mark.parametrize("method", library_methods())
def test_abstract_batch_has_the_trainers_fields(method):
    cfg = load_train_config(None, [f"method={method}", "policy.kl_beta=0.01",
                                   "data.max_prompt_tokens=100", "rollout.max_new_tokens=40"])
    batch = cfg.abstract_batch()
    present = set(batch.present)
    assert ("teacher_logprobs" in present) == (method in ("amr_sd", "rlsd"))
    assert ("teacher_prompt_ids" in present) == (method == "sdpo")
    assert ("entropy" in present) == (method == "hapo")
    assert ("importance" in present) == (method in ("oar_g", "oar_p"))
    assert {"ref_logprobs", "old_logprobs", "sampler_logprobs"} <= present
    b = cfg.rollout.batch_size
    assert batch.prompt_ids.shape == (b, 128)  # bucketed prompt width
    assert batch.response_mask.shape == (b, 40)  # the sampler returns max_new_tokens columns
    assert batch.rewards.shape == (b,)
    if method == "sdpo":
        assert batch.teacher_prompt_ids.shape == (b, 384)  # reflection.max_teacher_prompt_tokens


def tiny_run(directory, *overrides):
    """A tiny model's config.json (no weights) and a run config on a 2 x 2 x 2 mesh."""
    d = directory / "tiny-model"
    d.mkdir(exist_ok=True)
    arch = tiny_config()
    (d / "config.json").write_text(json.dumps(arch.to_hf_dict()))
    base = [f"model.name={d}", "method=grpo", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
            "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=16",
            "data.max_prompt_tokens=16", "micro_batches=1"]
    return load_train_config(None, base + list(overrides)), arch


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_dry_run_compiles_from_shapes_and_reports_memory(tmp_path, monkeypatch):
    from amrsd_jax.models.decoder import Decoder

    config, arch = tiny_run(tmp_path)
    # every Decoder built during the dry run must hold abstract (traced) parameters only
    built = []
    init = Decoder.__init__

    def spy(self, cfg, *, rngs):
        init(self, cfg, rngs=rngs)
        built.append(isinstance(self.embed_tokens.embedding[...], jax.core.Tracer))

    monkeypatch.setattr(Decoder, "__init__", spy)
    embed_shape = (arch.vocab_size, arch.hidden_size)
    live_before = sum(a.shape == embed_shape for a in jax.live_arrays())
    lines = []
    report = aot.dry_run(config, devices=jax.devices()[:8], hbm_gib=1.0, sampler=False,
                         out=lines.append)

    assert built and all(built)
    assert sum(a.shape == embed_shape for a in jax.live_arrays()) == live_before
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and report["devices"] == 8
    assert report["model"]["params"] == arch.num_params()
    assert set(report["programs"]) == {"score_old", "update"}
    for prog in report["programs"].values():
        assert prog["argument"] > 0 and prog["temp"] > 0 and prog["total"] > 0
    step = report["programs"]["update"]
    # arguments are per device: the sharded state (params + 2 Adam moments) is smaller than
    # one unsharded copy of it, and the donated state is aliased by the new state
    state = report["state_gib_per_device"]
    full_state_gib = 3 * 4 * arch.num_params() / aot.GIB
    assert state["params"] + state["optimizer"] <= step["argument"] < full_state_gib
    assert step["alias"] > 0.9 * (state["params"] + state["optimizer"])
    assert report["fits"] and report["peak_gib"] == max(p["peak"] for p in
                                                        report["programs"].values())
    text = "\n".join(lines)
    assert "FITS" in text and "estimate" in text and "data=2 x fsdp=2 x tensor=2" in text

    # the same (now cached) programs against a budget they cannot meet
    lines.clear()
    tight = aot.dry_run(config, devices=jax.devices()[:8], hbm_gib=1e-6, sampler=False,
                        out=lines.append)
    assert not tight["fits"] and "DOES NOT FIT, over by" in "\n".join(lines)
    # XLA:CPU's numbers are an upper bound: over budget on them is labelled, not a verdict
    assert tight["estimate"] and "CPU upper-bound estimate (not conclusive" in "\n".join(lines)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_mesh_that_does_not_match_the_devices_is_a_config_error(tmp_path):
    config, _ = tiny_run(tmp_path, "mesh.tensor=4")
    with pytest.raises(ConfigError, match="needs 16 devices but 8 are available"):
        aot.dry_run(config, devices=jax.devices()[:8], out=lambda _: None)


def test_options_and_reexec_command(tmp_path):
    rest, opts = aot.split_options(["steps=3", "dry_run.hbm_gib=32", "dry_run.tpu=v4"])
    assert rest == ["steps=3"] and opts == {"hbm_gib": "32", "tpu": "v4"}
    with pytest.raises(ConfigError, match="dry_run.hbm_gib"):
        aot.split_options(["dry_run.hbm=3"])
    argv, env = aot.reexec_command("c.yaml", ["steps=3"], 16,
                                   env={"XLA_FLAGS": "--xla_foo=1 "
                                                     "--xla_force_host_platform_device_count=8"})
    assert argv[1:] == ["-m", "amrsd_jax.train.aot", "--config", "c.yaml", "steps=3"]
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=16"
    assert env["JAX_PLATFORMS"] == "cpu" and env["AMRSD_DRY_RUN_CHILD"] == "1"
    assert aot.hbm_budget(tpu="v4") == (32.0, "TPU v4")
    assert aot.hbm_budget(hbm_gib=10)[0] == 10.0 and aot.hbm_budget()[0] == 16.0
    assert aot.needed_devices(load_train_config(None, ["mesh.data=2", "mesh.fsdp=4"])) == 8
    # configuration errors are exit code 2, before anything is compiled
    assert aot.main_dry_run(None, ["rollout.group_size=1"]) == 2
    assert aot.main_dry_run(None, ["dry_run.tpu=v9"]) == 2
    assert aot.main_dry_run(None, ["dry_run.target=gpu"]) == 2
    # compile-only TPU topologies: v4 / v5e / v6e with a slice of that many devices
    assert aot.tpu_topology_devices("v5p", 16) is None
    assert aot.tpu_topology_devices("v4", 12) is None
    assert aot.main_dry_run(None, ["dry_run.target=tpu", "dry_run.tpu=v5p"]) == 2
    assert aot._TPU_TOPOLOGIES["v4"][16] == "v4:2x2x4"  # v4-32: 16 chips in megacore mode
    with pytest.raises(RuntimeError, match="needs 10000 devices"):
        aot.ensure_fake_devices(10000)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("method", ["amr_sd", "sdpo"])
def test_dry_run_lowers_the_trainers_own_programs(tmp_path, method):
    """The dry run builds its programs with the trainer's builder from shapes alone: the
    update step and the scorer lower to the same program text as the trainer's, which
    holds real weights."""
    from conftest import write_tiny_checkpoint

    from amrsd_jax.train.trainer import Trainer

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    config = load_train_config(None, [
        f"model.name={ckpt}", f"method={method}", "mesh.data=2", "mesh.fsdp=2",
        "mesh.tensor=2", "rollout.prompts_per_step=2", "rollout.group_size=4",
        "rollout.max_new_tokens=8", "data.max_prompt_tokens=64", "data.train_size=8",
        "data.eval_size=0", "checkpoint.every=0", "checkpoint.save_at_end=false",
        "eval.at_start=false", "eval.at_end=false", f"output_dir={tmp_path / 'run'}",
        "progress=false", "tensorboard=false"])
    trainer = Trainer(config, log=lambda m: None)
    run = aot._abstract_run(config, jax.devices()[:8])
    real, dry = trainer.programs, run.programs
    batch = config.abstract_batch(real.mesh, trainer.method)
    lowered_real = real.update.jitted.lower(trainer.state, batch, trainer.teacher_params,
                                            real.update.other)
    lowered_dry = dry.update.jitted.lower(run.state, dry.batch, run.teacher, dry.update.other)
    assert lowered_real.as_text() == lowered_dry.as_text()
    shapes = config.shapes()
    seq = jax.ShapeDtypeStruct((shapes.rows, shapes.prompt), "int32")
    resp = jax.ShapeDtypeStruct((shapes.rows, shapes.response), "int32")
    assert real.score_old.lower(trainer.state.params, seq, seq, resp, resp).as_text() == \
        dry.score_old.lower(run.state.params, seq, seq, resp, resp).as_text()
    trainer.close()
