"""The package stands on its own: the ``amrsd`` console script works from any directory
with the bundled configs, and no file of the repository points outside it."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST_COMPILE_FLAGS

from amrsd_jax.config import BUNDLED_CONFIGS, find_config
from amrsd_jax.train.config import load_train_config

REPO = Path(__file__).resolve().parent.parent
# built from parts so that this file does not match its own check
FORBIDDEN = ("SPEC" + ".md", "../" + "shared")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s#]+)")


def _console_script() -> str:
    script = shutil.which("amrsd") or shutil.which("amrsd", path=str(Path(sys.executable).parent))
    assert script, "the `amrsd` console script is not installed: pip install -e ."
    return script


def _run(args, cwd) -> subprocess.CompletedProcess:
    # one CPU device, as a user's shell has (the tests' own XLA_FLAGS fake 8)
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE_FLAGS)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_console_script_help_from_any_directory(tmp_path):
    out = _run([_console_script(), "--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: amrsd")
    for command in ("train", "eval", "generate", "export", "bench", "ttsd"):
        assert command in out.stdout


def test_console_script_finds_the_bundled_configs(tmp_path):
    """`amrsd train --print-config` in a directory without configs/ resolves the bundled
    quickstart, and prints exactly what `python run.py train --print-config` prints in the
    repository."""
    assert not (tmp_path / "configs").exists()
    script = _run([_console_script(), "train", "--print-config", "steps=3"], tmp_path)
    assert script.returncode == 0, script.stderr
    in_repo = _run([sys.executable, "run.py", "train", "--print-config", "steps=3"], REPO)
    assert in_repo.returncode == 0, in_repo.stderr
    assert script.stdout == in_repo.stdout
    assert "method: amr_sd" in script.stdout and "steps: 3" in script.stdout
    methods = _run([_console_script(), "train", "--config", "configs/methods/grpo.yaml",
                    "--print-config"], tmp_path)
    assert methods.returncode == 0 and "method: grpo" in methods.stdout, methods.stderr


def test_find_config_prefers_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bundled = find_config("configs/quickstart.yaml")
    assert bundled == BUNDLED_CONFIGS / "quickstart.yaml" and bundled.is_file()
    assert find_config("quickstart.yaml") == bundled
    assert load_train_config("configs/quickstart.yaml").output_dir == "runs/quickstart"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quickstart.yaml").write_text("steps: 2\n")
    assert find_config("configs/quickstart.yaml") == Path("configs/quickstart.yaml")
    assert load_train_config("configs/quickstart.yaml").steps == 2
    assert find_config("configs/none.yaml") == Path("configs/none.yaml")  # error names it


def test_bundled_configs_are_the_repository_configs():
    """One source of truth: amrsd_jax/configs is the repository's configs/ (a link), so the
    installed package data cannot drift from what the README documents."""
    assert BUNDLED_CONFIGS.resolve() == (REPO / "configs").resolve()


def _repository_files() -> list[Path]:
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run([git, "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / name for name in listed.splitlines() if (REPO / name).is_file()]


def test_no_file_points_outside_the_repository():
    """The method specification is docs/methods.md; nothing may cite a file that a clone
    does not have, and every relative Markdown link must resolve inside the repository."""
    offenders, broken = [], []
    for path in _repository_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        rel = path.relative_to(REPO)
        offenders += [f"{rel}: {word}" for word in FORBIDDEN if word in text]
        if path.suffix in (".md", ".ipynb"):
            for target in MARKDOWN_LINK.findall(text):
                if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                    continue
                resolved = (path.parent / target).resolve()
                if REPO.resolve() not in resolved.parents or not resolved.exists():
                    broken.append(f"{rel}: {target}")
    assert not offenders, offenders
    assert not broken, broken
    assert (REPO / "docs" / "methods.md").is_file()


def test_first_use_of_the_bundled_model_says_where_and_how_big(tmp_path, monkeypatch,
                                                                 capsys):
    """The one slow first-run step (GGUF -> safetensors cache) says what it writes where;
    later loads are silent."""
    from amrsd_jax.models import gguf_import

    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"\0" * 2**20)

    def fake_convert(path, out_dir, dtype):  # writes the cache and its marker, like the real one
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"\0" * 3 * 2**20)
        key = gguf_import._source_key(path, dtype)  # the cache marker the real one writes
        (out_dir / gguf_import.MARKER_FILE).write_text(json.dumps(key))

    monkeypatch.setattr(gguf_import, "bundled_gguf_path", lambda: gguf_file)
    monkeypatch.setattr(gguf_import, "convert_gguf_to_hf", fake_convert)
    cache = tmp_path / "cache" / "smol"
    assert gguf_import.ensure_bundled_checkpoint(cache) == cache
    err = capsys.readouterr().err
    assert f"converting model.gguf (1 MiB) to a float32 safetensors cache in {cache}" in err
    assert f"3 MiB in {cache}" in err
    gguf_import.ensure_bundled_checkpoint(cache)
    assert capsys.readouterr().err == ""


def test_user_reward_function_by_module_path(tmp_path, monkeypatch):
    """`reward.name=module:function` loads a user's reward; a wrong one is a config error
    that names it, before anything is loaded."""
    from amrsd_jax.config import ConfigError
    from amrsd_jax.rewards import get_reward_fn, safe_reward

    (tmp_path / "my_rewards.py").write_text(
        "def exact(response, gold, **kw):\n    return float(response.strip() == gold)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = load_train_config(None, ["reward.name=my_rewards:exact", "reward.strict=false"])
    fn = get_reward_fn(config.reward_name())
    assert fn.__module__ == "my_rewards"
    assert safe_reward(config.reward_name(), " 42 ", "42").reward == 1.0
    assert safe_reward(config.reward_name(), "41", "42").reward == 0.0
    with pytest.raises(ConfigError, match="my_rewards:missing"):
        load_train_config(None, ["reward.name=my_rewards:missing", "reward.strict=false"])
