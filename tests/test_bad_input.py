"""Bad input fails early with a message naming the problem and the fix; nothing unsafe is
ever evaluated."""

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amrsd_jax.cli import main
from amrsd_jax.config import ConfigError, to_dict
from amrsd_jax.data import DataFormatError
from amrsd_jax.train.aot import hbm_budget
from amrsd_jax.train.config import DataConfig, check_mesh, config_changes, load_train_config
from amrsd_jax.train.data import load_examples

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
    with pytest.raises(ConfigError, match=re.escape(str(bad)) + " line 1: could not "
                       "determine a constructor.*python/object.*no tags"):
        load_train_config(bad)


# ----------------------------------------------------------------------------- the command line
def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Bad settings and paths the README promises to refuse before anything is loaded:
    ``case -> (arguments, what the one error line must name)``."""
    (tmp / "data.csv").write_text("question,answer\n1+1,2\n")
    (tmp / "a_file").write_text("")
    (tmp / "evil.yaml").write_text("steps: !!python/object/apply:os.system ['echo pwned']\n")
    return {
        "temperature": (["rollout.temperature=-1"], "rollout.temperature"),
        "top_p": (["rollout.top_p=5"], "rollout.top_p"),
        "top_k": (["rollout.top_k=-3"], "rollout.top_k"),
        "reward": (["reward.name=nonexistent"], "reward.name"),
        "eval_size": (["data.eval_size=-4"], "data.eval_size"),
        "level": (["data.level=[9]"], "data.level"),
        "max_to_keep": (["checkpoint.max_to_keep=0"], "checkpoint.max_to_keep"),
        "missing data": (["data.source=local", f"data.path={tmp}/missing.jsonl"],
                         "missing.jsonl"),
        "csv data": (["data.source=local", f"data.path={tmp}/data.csv"], "data.csv"),
        "data dir": (["data.source=local", f"data.path={tmp}"], "is a directory"),
        "model": ([f"model.name={tmp}/no-such-model"], "no-such-model"),
        "output file": ([f"output_dir={tmp}/a_file/run"], "a_file is a file"),
        "output unwritable": (["output_dir=/proc/amrsd-run"], "cannot write in /proc"),
        "output empty": (["output_dir="], "output_dir is empty"),
        "yaml tag": (["--config", f"{tmp}/evil.yaml"], "evil.yaml line 1"),
    }


BAD_INPUTS = ["temperature", "top_p", "top_k", "reward", "eval_size", "level", "max_to_keep",
              "missing data", "csv data", "data dir", "model", "output file",
              "output unwritable", "output empty", "yaml tag"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_in_one_line_before_loading(case, tmp_path, capsys):
    """`train` on the bundled-model quickstart (the CLI's own ``main``, in this process):
    exit 2, one line on stderr naming the key or file, no traceback, and well under a
    second of CPU (no model load, no compile: those took minutes)."""
    args, named = _bad_inputs(tmp_path)[case]
    cpu = time.process_time()
    code = main(["train", *args])
    cpu = time.process_time() - cpu
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert named in lines[0], lines[0]
    assert cpu < 2, f"{cpu:.1f}s of CPU"


def test_run_py_exits_2_in_one_line_within_seconds(tmp_path):
    """The same through `python run.py` in a fresh process (imports included)."""
    t0, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "run.py", "train", "rollout.temperature=-1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    elapsed, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "rollout.temperature" in lines[0], lines[0]
    # ~3 s on an idle 2-core machine (Python + jax imports); loading the model and
    # compiling took minutes. The CPU time of the child is the load-independent measure;
    # the wall time only guards against a hang on a machine shared with other jobs.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 10, f"{cpu:.1f}s of CPU"
    assert elapsed < 60, f"{elapsed:.1f}s"


def test_refused_run_writes_nothing_into_the_existing_one(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "5").mkdir(parents=True)  # a committed orbax step
    (run / "config.json").write_text("the earlier run's config")
    (run / "metrics.jsonl").write_text('{"step": 5}\n')
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    with pytest.raises(ConfigError, match=r"already holds checkpoints \[5\].*--resume"):
        main(["train", f"output_dir={run}", "--debug"])
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before
    assert (run / "config.json").read_text() == "the earlier run's config"


def test_overrides_are_accepted_after_flags(capsys):
    assert main(["train", "steps=1", "--resume", "seed=2", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "\nsteps: 1\n" in printed and "\nseed: 2\n" in printed


def test_debug_shows_the_error_itself(tmp_path, capsys):
    args = ["train", "data.source=local", f"data.path={tmp_path}/missing.jsonl"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().endswith("missing.jsonl': no such file")
    with pytest.raises(ConfigError, match="no such file"):
        main(args + ["--debug"])


def test_dry_run_advice_names_real_options():
    _, source = hbm_budget(None, None, "")
    assert "dry_run.hbm_gib=" in source and "dry_run.tpu=" in source
    assert "--hbm-gib" not in source and "--tpu" not in source


def test_on_bad_row_reaches_the_loader(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "no answer"}\n')
    examples, skipped, problems = load_examples(DataConfig(source="local", path=str(data)),
                                                "train")
    assert len(examples) == 1 and skipped == 1 and "d.jsonl:2" in problems[0]
    with pytest.raises(DataFormatError, match="d.jsonl:2"):
        load_examples(DataConfig(source="local", path=str(data), on_bad_row="error"), "train")


def test_resume_config_diff_is_by_value():
    cfg = load_train_config(ROOT / "configs" / "quickstart.yaml")
    saved = json.loads(json.dumps(to_dict(cfg)))  # as the checkpoint holds it: lists
    assert config_changes(saved, to_dict(cfg)) == []
    other = load_train_config(ROOT / "configs" / "quickstart.yaml",
                              ["model.dtype=bfloat16", "method=grpo", "steps=99"])
    assert config_changes(saved, to_dict(other)) == [
        "method: 'amr_sd' -> 'grpo'", "model.dtype: 'float32' -> 'bfloat16'"]


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
