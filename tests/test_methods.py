"""Methods are units: a method registered from a test file trains through the unchanged
loop, and the loop, the step, the scorer and the dry run never name a method."""

import ast
import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import write_tiny_checkpoint  # also registers reward test_even_length

from amrsd_jax.methods import METHODS, Method, get_method, make_method, register
from amrsd_jax.methods.base import TeacherInputs
from amrsd_jax.train.config import load_train_config
from amrsd_jax.train.trainer import Trainer


PACKAGE = Path(__file__).resolve().parent.parent / "amrsd_jax"
# the places that must work for any method without knowing which
# (ttsd.py is SDPO at test time by definition, so it is not on this list)
# (train/config.py is not either: its default ``method`` is the library's main one)
METHOD_BLIND = ["train/trainer.py", "train/phases.py", "train/loop.py", "train/aot.py",
                "update.py", "scoring.py", "programs.py", "batch.py"]


@dataclasses.dataclass(frozen=True)
class LastTokenConfig:
    weight: float = 3.0


@register
class LastToken(Method):
    """A toy method: the last response token carries ``weight`` x the sequence advantage;
    its host hook fills the ``importance`` field with that per-token weight."""

    name = "toy_last_token"
    config_type = LastTokenConfig
    fields = ("importance",)

    def teacher_inputs(self, ctx, rollouts):
        rows = np.arange(0)
        return TeacherInputs(None, None, None, rows, rows, metrics={"toy_seen_rows":
                                                                    rollouts.num_rows})

    def score(self, ctx, rollouts, teacher, batch):
        mask = rollouts.response_mask
        last = np.zeros(mask.shape, np.float32)
        lengths = mask.sum(1)
        last[np.arange(len(mask)), np.maximum(lengths - 1, 0)] = 1.0
        weights = np.where(mask > 0, 1.0 + (self.config.weight - 1.0) * last, 0.0)
        return batch.replace(importance=weights.astype(np.float32)), {}

    def token_advantages(self, advantages, batch, mask, step):
        ahat = advantages[:, None] * batch.importance * mask
        return ahat, {"weight_mean": jnp.sum(batch.importance) / jnp.maximum(jnp.sum(mask), 1)}


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt")))


def _config(checkpoint_dir, out, method, *extra):
    return load_train_config(None, [
        f"method={method}", f"model.name={checkpoint_dir}", "steps=1",
        "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=6",
        "data.train_size=16", "data.eval_size=3", "eval.at_start=false", "eval.at_end=false",
        "checkpoint.every=0", "checkpoint.save_at_end=false", "reward.name=test_even_length",
        f"output_dir={out}", "optimizer.learning_rate=1e-2", "progress=false",
        "tensorboard=false", *extra])


def test_a_method_registered_outside_the_library_trains(checkpoint_dir, tmp_path):
    config = _config(checkpoint_dir, tmp_path / "toy", "toy_last_token",
                     "method_config.toy_last_token.weight=5.0")
    trainer = Trainer(config, log=lambda m: None)
    assert trainer.method == LastToken(LastTokenConfig(weight=5.0))
    record = trainer.train_step(0)
    trainer.close()
    m = record.metrics
    assert m["toy_seen_rows"] == 8 and np.isfinite(m["loss"]) and m["update_skipped"] == 0
    # the traced hook ran inside the step: its diagnostic and its advantages are logged
    mask = record.batch.response_mask
    assert m["toy_last_token/weight_mean"] == pytest.approx(
        float(record.batch.importance.sum() / mask.sum()), rel=1e-6)
    assert m["toy_last_token/weight_mean"] > 1.0
    assert set(record.batch.present) == set(trainer.programs.batch.present)
    with pytest.raises(ValueError, match="did you mean 'weight'"):
        _config(checkpoint_dir, tmp_path / "bad", "toy_last_token",
                "method_config.toy_last_token.wieght=2")


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"toy_last_token"}))
def test_method_blind_modules_name_no_method(name):
    """No string constant or identifier in the loop / step / scorer / dry run is a
    registered method's name (docstrings excluded)."""
    for rel in METHOD_BLIND:
        tree = ast.parse((PACKAGE / rel).read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docstrings:
                assert name not in node.value.split(), f"{rel}:{node.lineno} names {name!r}"
            if isinstance(node, (ast.Name, ast.Attribute)):
                ident = node.id if isinstance(node, ast.Name) else node.attr
                assert ident != name, f"{rel}:{node.lineno} uses {name!r}"


def test_registry():
    assert {"grpo", "amr_sd", "rlsd", "sdpo", "hapo", "oar_g", "oar_p"} <= set(METHODS)
    with pytest.raises(ValueError, match="did you mean 'amr_sd'"):
        get_method("amrsd")
    with pytest.raises(ValueError, match="already registered"):
        register(type("Other", (Method,), {"name": "grpo"}))
    with pytest.raises(ValueError, match="unknown update-batch fields"):
        register(type("Bad", (Method,), {"name": "bad_fields", "fields": ("logits",)}))
    with pytest.raises(TypeError, match="takes no settings"):
        make_method("grpo", LastTokenConfig())
    # methods are static arguments of the step: equal settings, equal (hashable) methods
    assert make_method("amr_sd") == make_method("amr_sd")
    assert hash(make_method("sdpo")) == hash(make_method("sdpo"))
    assert make_method("oar_g") != make_method("oar_p")


def test_run_counters_round_trip_through_a_checkpoint_dict():
    """What ``Trainer.save`` writes (``as_dict``) restores every total on resume, the loop's
    own and a method's; a name the checkpoint lacks keeps its value."""
    from amrsd_jax.train.phases import Counters

    saved = Counters(reward_errors=3, skipped_steps=2, method={"redactions": 5})
    saved.add({"redactions": 1, "dropped_groups": 4})
    fresh = Counters(skipped_long_prompts=7, method={"redactions": 0})
    fresh.load({k: v for k, v in saved.as_dict().items() if k != "skipped_long_prompts"})
    assert fresh.as_dict() == {**saved.as_dict(), "skipped_long_prompts": 7}
    assert fresh.as_dict()["redactions"] == 6 and fresh.dropped_groups == 4
