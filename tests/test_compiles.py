"""Compilations per step (the ``compiles`` metric) and ``static_shapes``: with it no step
after the first compiles, for AMR-SD whose reflection sampler and teacher scorer otherwise
see a new row bucket or prompt width as the reflected rows change.

The session's persistent compilation cache is off here: a cache hit is not a compilation,
so a shared cache would hide the recompiles this test is about."""

import pytest

from conftest import write_tiny_checkpoint  # also registers reward test_even_length

from amrsd_jax.train.config import load_train_config
from amrsd_jax.train.metrics import read_metrics
from amrsd_jax.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("no_compilation_cache")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt")))


def _compiles_per_step(checkpoint_dir, out, static_shapes: bool) -> list[int]:
    cfg = load_train_config(None, [
        "method=amr_sd", f"model.name={checkpoint_dir}", "steps=4", "seed=3",
        "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=6",
        "reflection.max_tokens=6", "reflection.skip_uninformative=false",
        "reflection.max_teacher_prompt_tokens=200", "reflection.max_prompt_tokens=300",
        "method_config.amr_sd.tau=0.0", "data.train_size=16", "eval.at_start=false",
        "eval.at_end=false", "checkpoint.every=0", "checkpoint.save_at_end=false",
        "reward.name=test_even_length", f"output_dir={out}", "optimizer.learning_rate=1e-2",
        "progress=false", "tensorboard=false", f"static_shapes={str(static_shapes).lower()}"])
    trainer = Trainer(cfg)
    trainer.run()
    trainer.close()
    return [r["compiles"] for r in read_metrics(out / "metrics.jsonl")]


def test_static_shapes_compile_only_in_the_first_step(checkpoint_dir, tmp_path):
    bucketed = _compiles_per_step(checkpoint_dir, tmp_path / "bucketed", False)
    static = _compiles_per_step(checkpoint_dir, tmp_path / "static", True)
    assert bucketed[0] > 0 and static[0] > 0
    # bucketed shapes: the reflection requests / teacher prompts change width step to step
    assert sum(bucketed[1:]) > 0, bucketed
    assert static[1:] == [0, 0, 0], static
