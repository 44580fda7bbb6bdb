"""Bad input fails early with a message naming the problem and the fix; nothing unsafe is
ever evaluated."""

import re
from pathlib import Path

import pytest

from amrsd_jax.config import ConfigError
from amrsd_jax.train.config import check_mesh, load_train_config

ROOT = Path(__file__).resolve().parents[1]

BAD_CONFIGS = [
    (["rollut.group_size=4"], r"unknown config key 'rollut' \(did you mean 'rollout'\?\)"),
    (["rollout.gruop_size=4"], r"did you mean 'group_size'"),
    (["rollout.group_size=four"], r"rollout.group_size: got 'four'.*expected an integer"),
    (["rollout.group_size=1"], r"group_size=1: group-relative advantages need at least 2"),
    (["method=grpo2"], r"unknown method 'grpo2' \(did you mean 'grpo'\?\)"),
    (["method_config.amr_sd.tua=0.3"], r"method_config.amr_sd.'tua' \(did you mean 'tau'\?\)"),
    (["method_config.grpo.tau=0.3"], r"method 'grpo' takes no settings"),
    (["method_config.amrsd.tau=0.3"], r"unknown method 'amrsd' \(did you mean 'amr_sd'\?\)"),
    (["micro_batches=3"], r"micro_batches=3 does not divide the step's 16 rollouts"),
    (["method=rlsd", "data.source=local", "data.path=x.jsonl"],
     r"method 'rlsd' needs a reference solution.*set data.solution_field"),
    (["data.source=tfds"], r"data.source=tfds needs data.tfds_name"),
    (["data.on_long_prompt=cut"], r"on_long_prompt must be one of \('skip', 'truncate'\)"),
    (["optimizer.schedule=linear"], r"schedule must be 'constant' or 'cosine'"),
    (["model.dtype=float16"], r"dtype must be 'float32' or 'bfloat16'"),
    (["reward.on_error=ignore"], r"on_error must be 'zero' or 'drop_group'"),
    (["output_dir=runs/{model}"], r"only \{method\} and \{seed\} can be filled in"),
    (["steps"], r"override 'steps' is not key=value"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS,
                         ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(ROOT / "configs" / "base.yaml", overrides)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(ROOT / "configs" / "nope.yaml")


def test_config_base_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_train_config(tmp_path / "a.yaml")


def test_yaml_tags_are_not_executed(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text("steps: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match="could not determine a constructor|python/object"):
        load_train_config(bad)


@pytest.mark.parametrize("mesh,devices,expected", [
    (dict(data=4, fsdp=4), 8, r"needs 16 devices but 8 are available"),
    (dict(fsdp=3), 8, r"fsdp=3 x tensor=1 does not divide the 8 devices"),
    (dict(data=8), 8, (8, 1, 1)),
    (dict(data=-1, fsdp=2, tensor=2), 8, (2, 2, 2)),
])
def test_mesh_shape_against_device_count(mesh, devices, expected):
    cfg = load_train_config(ROOT / "configs" / "quickstart.yaml",
                            [f"mesh.{k}={v}" for k, v in mesh.items()])
    if isinstance(expected, tuple):
        assert check_mesh(cfg, devices) == expected
    else:
        message = expected
        with pytest.raises(ConfigError, match=message):
            check_mesh(cfg, devices)


def test_batch_not_divisible_by_data_axis():
    cfg = load_train_config(ROOT / "configs" / "quickstart.yaml",
                            ["rollout.prompts_per_step=3", "rollout.group_size=2"])
    with pytest.raises(ConfigError, match=r"6 rows, not divisible by the batch axes .* = 4"):
        check_mesh(cfg, 4)


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        load_train_config(path)


# ----------------------------------------------------------------------------- safety
UNSAFE = [
    (r"(?<![\w.])eval\(", "eval("),
    (r"(?<![\w.])exec\(", "exec("),
    (r"\bimport pickle\b|\bpickle\.load", "pickle"),
    (r"yaml\.load\(|yaml\.unsafe_load|Loader=yaml\.(?:Full)?Loader", "unsafe YAML loading"),
    (r"trust_remote_code\s*=\s*True", "trust_remote_code=True"),
    (r"allow_pickle\s*=\s*True", "numpy allow_pickle"),
]


def test_no_unsafe_calls_in_the_package():
    """Nothing from a model, a data set or a checkpoint can reach eval/exec/pickle, YAML is
    loaded safely, and remote code is never trusted implicitly."""
    offenders = []
    for path in sorted((ROOT / "amrsd_jax").rglob("*.py")):
        text = path.read_text()
        for pattern, what in UNSAFE:
            for m in re.finditer(pattern, text):
                line = text.count("\n", 0, m.start()) + 1
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not offenders, offenders
