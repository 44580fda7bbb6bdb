"""output_dir may be a local path or a URL (gs://bucket/run): a URL reaches orbax, the
metrics writer and TensorBoard unchanged, and the files go through etils.epath. No network:
gs:// is mocked onto a local directory (etils.epath.testing)."""

import json
import os
from pathlib import Path

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from amrsd_jax.train import checkpoint as checkpoint_module
from amrsd_jax.train.checkpoint import RunCheckpointer
from amrsd_jax.train.config import check_run_inputs, load_train_config
from amrsd_jax.train.metrics import MetricsLogger, read_metrics

URL = "gs://bucket/run"


@pytest.fixture
def fake_gcs(tmp_path):
    """gs://... paths served from ``tmp_path/gcs`` (an object store that cannot append)."""
    root = tmp_path / "gcs"
    root.mkdir()

    def local(path) -> str:
        text = os.fspath(path)
        assert text.startswith("gs://"), text
        return str(root / text[len("gs://"):])

    def no_append_open(_, path, mode):
        assert "a" not in mode, "object stores cannot append"
        return open(local(path), mode)

    def makedirs(_, path, exist_ok=False):
        os.makedirs(local(path), exist_ok=exist_ok)

    def mkdir(_, path, exist_ok=False):
        if not (exist_ok and os.path.isdir(local(path))):
            os.mkdir(local(path))

    with epath_testing.mock_epath(
            open=no_append_open, exists=lambda _, p: os.path.exists(local(p)),
            isdir=lambda _, p: os.path.isdir(local(p)),
            listdir=lambda _, p: os.listdir(local(p)), makedirs=makedirs, mkdir=mkdir,
            rename=lambda _, p, d: os.rename(local(p), local(d)),
            replace=lambda _, p, d: os.replace(local(p), local(d)),
            remove=lambda _, p: os.remove(local(p)),
            stat=lambda orig, p: orig(local(p))):
        yield root


def test_url_reaches_orbax_unchanged(monkeypatch):
    seen = []

    class RecordingManager:
        def __init__(self, directory, options=None):
            seen.append(directory)

    monkeypatch.setattr(checkpoint_module.ocp, "CheckpointManager", RecordingManager)
    assert RunCheckpointer(epath.Path(URL) / "checkpoints").directory == URL + "/checkpoints"
    assert RunCheckpointer(f"{URL}/checkpoints", read_only=True).directory == \
        URL + "/checkpoints"
    assert seen == [URL + "/checkpoints"] * 2
    RunCheckpointer("relative/checkpoints")  # a local path is still made absolute
    assert seen[-1] == os.path.abspath("relative/checkpoints")


def test_metrics_and_tensorboard_go_to_the_url(fake_gcs, monkeypatch):
    logdirs = []
    monkeypatch.setattr("tensorboardX.SummaryWriter",
                        lambda logdir: logdirs.append(logdir) or _NoWriter())
    logger = MetricsLogger(URL, tensorboard=True)
    for step in (1, 2, 3):
        logger.log(step, {"reward_mean": step / 10})
    logger.close()
    assert logdirs == [URL + "/tensorboard"]
    on_store = fake_gcs / "bucket" / "run" / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in on_store.read_text().splitlines()] == [1, 2, 3]
    assert [r["step"] for r in read_metrics(f"{URL}/metrics.jsonl")] == [1, 2, 3]
    assert not Path("gs:").exists()  # nothing under ./gs:/bucket/run

    # resume from step 2: the file is kept whole under a new name, then cut
    logger = MetricsLogger(URL, tensorboard=False)
    dropped, whole = logger.truncate_after(2)
    assert dropped == 1 and os.fspath(whole).startswith(URL + "/metrics.")
    logger.log(3, {"reward_mean": 0.5})
    assert [r["reward_mean"] for r in read_metrics(f"{URL}/metrics.jsonl")] == [0.1, 0.2, 0.5]
    assert len(read_metrics(whole)) == 3


def test_only_the_main_process_writes(tmp_path):
    logger = MetricsLogger(tmp_path / "run", tensorboard=True, enabled=False)
    logger.log(1, {"reward_mean": 0.1})
    assert logger.move_aside() is None and logger.truncate_after(0) == (0, None)
    assert not (tmp_path / "run").exists()


def test_url_output_dir_is_kept_and_checked_without_local_writes(fake_gcs):
    cfg = load_train_config(None, [f"output_dir={URL}", "method=grpo"])
    assert cfg.output_dir == URL
    check_run_inputs(cfg)  # no local directory named gs: is probed or created
    assert not Path("gs:").exists()
    (fake_gcs / "bucket" / "run" / "checkpoints" / "4").mkdir(parents=True)
    with pytest.raises(Exception, match=r"already holds checkpoints \[4\]"):
        check_run_inputs(cfg)
    check_run_inputs(cfg, resume=True)


class _NoWriter:
    def add_scalar(self, *args):
        pass

    def flush(self):
        pass

    def close(self):
        pass
