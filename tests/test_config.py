"""Typed configs: YAML + overrides, unknown keys name the nearest valid key."""

import dataclasses

import pytest

from amrsd_jax.config import ConfigError, build, load_config, parse_overrides, to_dict
from amrsd_jax.credit import AMRSDConfig
from amrsd_jax.losses import PolicyLossConfig
from amrsd_jax.methods import make_method, method_settings
from amrsd_jax.train.config import load_train_config
from amrsd_jax.update import OptimizerConfig, StepConfig


@dataclasses.dataclass(frozen=True)
class Demo:
    optimizer: OptimizerConfig = OptimizerConfig()
    policy: PolicyLossConfig = PolicyLossConfig()
    steps: int = 10
    name: str = "run"
    tau_values: tuple[float, ...] = (0.5,)
    seed: int | None = None


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 20\noptimizer:\n  learning_rate: 1.0e-5\n  schedule: cosine\n")
    cfg = load_config(Demo, f, ["policy.eps_high=0.3", "seed=3", "tau_values=[0.1, 1]"])
    assert cfg.steps == 20 and cfg.optimizer.learning_rate == 1e-5
    assert cfg.optimizer.schedule == "cosine" and cfg.policy.eps_high == 0.3
    assert cfg.seed == 3 and cfg.tau_values == (0.1, 1.0)
    assert to_dict(cfg)["optimizer"]["schedule"] == "cosine"


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError, match=r"'learning_rat'.*did you mean 'learning_rate'"):
        load_config(Demo, None, ["optimizer.learning_rat=1e-5"])
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        build(Demo, {"step": 3})


def test_wrong_types_and_invalid_values():
    with pytest.raises(ConfigError, match="steps.*expected an integer"):
        build(Demo, {"steps": "many"})
    with pytest.raises(ConfigError, match="expected a mapping"):
        build(Demo, {"optimizer": 3})
    with pytest.raises(ConfigError, match="schedule"):
        build(Demo, {"optimizer": {"schedule": "linear"}})
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["steps"])


def test_safe_yaml_only(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("steps: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match="constructor|tag"):
        load_config(Demo, f)


def test_method_settings_from_mapping():
    # StepConfig.method is a Method object now; a method's settings are built from its
    # ``method_config.<name>`` mapping by method_settings, with the same nearest-key errors.
    settings = method_settings("amr_sd", {"tau": 0.3})
    assert isinstance(settings, AMRSDConfig) and settings.tau == 0.3
    cfg = StepConfig(method=make_method("amr_sd", settings), group_size=4, micro_batches=2)
    assert cfg.method.config == settings and cfg.micro_batches == 2 and cfg.group_size == 4
    with pytest.raises(TypeError, match="Method object"):
        StepConfig(method="amr_sd")
    with pytest.raises(ConfigError, match=r"'tua'.*did you mean 'tau'"):
        method_settings("amr_sd", {"tua": 0.3})
    with pytest.raises(ValueError, match="did you mean 'amr_sd'"):
        method_settings("amrsd", {})
    run = load_train_config(None, ["method=amr_sd", "method_config.amr_sd.tau=0.3"])
    assert run.make_method().config.tau == 0.3
    assert run.step_config().method.config.tau == 0.3
    with pytest.raises(ConfigError, match="did you mean 'tau'"):
        load_train_config(None, ["method=amr_sd", "method_config.amr_sd.tua=0.3"])
