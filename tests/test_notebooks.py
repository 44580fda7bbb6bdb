"""Execute notebooks/*.ipynb top to bottom with nbclient, from a directory outside the
repository (as in Colab: the configs must come from the installed package, not the cwd).

The notebooks default to the bundled SmolLM2-135M model; here ``NB_MODEL`` points them at a
tiny random checkpoint (``conftest.write_tiny_checkpoint``) and the other ``NB_*`` parameters
shrink every run, so the whole file takes a few minutes on 2 CPU cores. The kernel inherits
``os.environ`` (set with ``monkeypatch``, restored afterwards).
"""

import importlib.util
import json
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from conftest import FAST_COMPILE_FLAGS, write_tiny_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT_S = 600  # per cell; the first compile of a step is the slow part


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("nb_tiny_model")))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One persistent XLA cache for all kernels: notebooks 01 and 02 compile the same
    sampler / scorer / update programs for the tiny model."""
    return str(tmp_path_factory.mktemp("nb_xla_cache"))


def run_notebook(name: str, monkeypatch, env: dict[str, str], cwd: Path):
    """Execute ``notebooks/<name>`` in a fresh kernel started in ``cwd`` with ``env`` added to
    the environment; returns the executed notebook (a failing cell raises
    ``CellExecutionError``)."""
    assert REPO not in cwd.resolve().parents, "the notebooks must run outside the repository"
    monkeypatch.chdir(cwd)
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    t0 = time.perf_counter()
    client.execute()
    print(f"{name}: {time.perf_counter() - t0:.0f}s")
    return nb


def outputs(nb):
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def widgets(nb) -> int:
    """Outputs rendered as Jupyter widgets (tqdm's notebook progress bars)."""
    return sum("application/vnd.jupyter.widget-view+json" in out.get("data", {})
               for out in outputs(nb))


def images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for out in outputs(nb))


def text(nb) -> str:
    parts = []
    for out in outputs(nb):
        if out.output_type == "stream":
            parts.append(out.text)
        elif "text/plain" in out.get("data", {}):
            parts.append(out.data["text/plain"])
    return "\n".join(parts)


def common_env(tiny_model_dir, compile_cache, **extra):
    env = {"NB_MODEL": tiny_model_dir, "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": compile_cache,
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.update(extra)
    return env


def test_all_notebooks_are_tested_and_saved_without_outputs():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["01_quickstart.ipynb", "02_cig_anatomy.ipynb", "03_tpu_pod.ipynb"]
    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert not any(c.outputs for c in code), f"{name} was saved with outputs"
        assert any("parameters" in c.metadata.get("tags", []) for c in code[:2]), name
        # Colab: the first cell installs the package where it is missing; no notebook may
        # depend on the working directory or on a file outside the repository
        assert "AMRSD_SOURCE" in code[0].source and "pip" in code[0].source, name
        for cell in nb.cells:
            assert "Path.cwd()" not in cell.source and "git clone" not in cell.source, name


def test_quickstart(tiny_model_dir, compile_cache, tmp_path, monkeypatch):
    out = tmp_path / "run"
    nb = run_notebook("01_quickstart.ipynb", monkeypatch, common_env(
        tiny_model_dir, compile_cache, XLA_FLAGS=FAST_COMPILE_FLAGS, NB_STEPS="2", NB_PROMPTS="2",
        NB_GROUP="2", NB_MAX_NEW_TOKENS="6", NB_OUTPUT_DIR=str(out)), cwd=tmp_path)
    assert images(nb) >= 1
    assert "amrsd_jax from" in text(nb)  # the install cell found the installed package
    assert "compiling the update step" in text(nb)  # the first step says why it is slow
    if importlib.util.find_spec("ipywidgets"):
        assert widgets(nb) >= 1  # the training progress bar is a widget, not text
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2]
    assert "checkpoint steps: [2]" in text(nb)


def test_cig_anatomy(tiny_model_dir, compile_cache, tmp_path, monkeypatch):
    nb = run_notebook("02_cig_anatomy.ipynb", monkeypatch, common_env(
        tiny_model_dir, compile_cache, XLA_FLAGS=FAST_COMPILE_FLAGS, NB_PROMPTS="2", NB_GROUP="2",
        NB_MAX_NEW_TOKENS="6", NB_REFLECTION_TOKENS="6", NB_MAX_STEPS="1",
        NB_OUTPUT_DIR=str(tmp_path)), cwd=tmp_path)
    assert images(nb) >= 2  # the token heatmaps and the gate plot
    out = text(nb)
    assert "QUESTION:" in out and "gated fraction: recomputed" in out


def test_tpu_pod(tiny_model_dir, compile_cache, tmp_path, monkeypatch):
    nb = run_notebook("03_tpu_pod.ipynb", monkeypatch, common_env(
        tiny_model_dir, compile_cache, XLA_FLAGS=FAST_COMPILE_FLAGS, NB_FAKE_DEVICES="8",
        NB_DRY_RUN_OVERRIDES="rollout.prompts_per_step=8 micro_batches=2 "
                             "rollout.max_new_tokens=16 data.max_prompt_tokens=16 "
                             "reflection.max_tokens=8 reflection.max_prompt_tokens=32 "
                             "reflection.max_teacher_prompt_tokens=32",
        NB_OUTPUT_DIR=str(tmp_path)), cwd=tmp_path)
    assert images(nb) >= 2  # the mesh layout and the memory bars
    report = json.loads((tmp_path / "dry_run.json").read_text())
    assert report["devices"] == 8 and report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert set(report["programs"]) >= {"update", "score_old", "score_teacher"}
    assert "skipped the TPU smoke run" in text(nb)
