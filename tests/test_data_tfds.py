"""load_tfds: prompts from a prepared TFDS dataset, read offline and without TensorFlow.

A tiny dataset is built in a tmp data_dir by a builder defined here (not registered, so it
is read back from its prepared files alone, like a directory copied from another machine),
in each file format load_tfds reads, with 2 shards.
"""

import socket
import struct
import subprocess
import sys

import numpy as np
import pytest

import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters

from amrsd_jax.data import (
    DataFormatError,
    DatasetNotPreparedError,
    FieldMap,
    PromptStream,
    load_tfds,
)
from amrsd_jax.data.tfds_source import _masked_crc32c

NAME = "amrsd_tiny_qa"
FORMATS = ["array_record", "parquet", "tfrecord"]

GSM = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
       "clips in May. How many clips did Natalia sell altogether in April and May?")
GSM_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def _rows():
    rows = [{"uid": "r0", "question": GSM, "answer": "72", "solution": GSM_SOLUTION}]
    for i in range(1, 11):
        a, b = 3 * i, 100 + i
        rows.append({"uid": f"r{i}", "question": f"What is {a} + {b}?", "answer": str(a + b),
                     "solution": f"{a} + {b} = {a + b}\n#### {a + b}"})
    rows[3]["question"] = ""  # bad: empty question
    rows[5]["question"] = b"\xff\xfe not utf-8"  # bad: invalid UTF-8
    rows[6].update(answer="1234", solution="600 + 634 = 1,234\n#### 1,234")
    rows[8]["solution"] = "no final answer marker here"  # bad only with answer_from_solution
    return rows


ROWS = _rows()
BAD = {"r3": "field 'question' is an empty string",
       "r5": "field 'question' has invalid UTF-8 bytes at byte 0"}


with tfds.core.registered.skip_registration():
    class AmrsdTinyQa(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            text = tfds.features.Text
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"uid": text(), "question": text(), "answer": text(), "solution": text(),
                 "meta": {"level": tfds.features.Scalar(np.int64)}}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, row in enumerate(ROWS):
                yield i, {**row, "meta": {"level": 10 * i}}


def _write_tfrecord(cls, path, iterator):
    """TFRecord writer without TensorFlow (TFDS writes tfrecord through tf.io)."""
    with open(path, "wb") as f:
        for _, ex in iterator:
            head = struct.pack("<Q", len(ex))
            f.write(head + struct.pack("<I", _masked_crc32c(head)) + ex
                    + struct.pack("<I", _masked_crc32c(ex)))


def _no_network(*args, **kwargs):
    raise AssertionError("network access in an offline test")


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket.socket, "connect_ex", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        yield


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, offline):
    """{file format: data_dir with the dataset prepared in it (2 shards)}."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(file_adapters.TfRecordFileAdapter, "write_examples",
                   classmethod(_write_tfrecord))
        for fmt in FORMATS:
            d = tmp_path_factory.mktemp(f"tfds_{fmt}")
            AmrsdTinyQa(data_dir=str(d), file_format=fmt).download_and_prepare(
                download_config=tfds.download.DownloadConfig(num_shards=2))
            out[fmt] = str(d)
    return out


@pytest.fixture(scope="module")
def read_order(dirs):
    """The uids in TFDS's own read order (tfds.data_source on the array_record copy)."""
    src = tfds.data_source(NAME, split="train", data_dir=dirs["array_record"],
                           download=False, try_gcs=False)
    order = [src[i]["uid"].decode() for i in range(len(src))]
    assert sorted(order) == sorted(r["uid"] for r in ROWS)
    assert order != [r["uid"] for r in ROWS]  # TFDS reorders rows when writing
    return order


def _expected(order, split="train"):
    by_uid = {r["uid"]: r for r in ROWS}
    out = []
    for k, uid in enumerate(order, start=1):
        if uid not in BAD:
            r = by_uid[uid]
            out.append({"id": f"{NAME}/{split}:{k}", "question": r["question"],
                        "answer": r["answer"], "solution": None})
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_reads_examples_in_tfds_order_and_reports_bad_rows(dirs, read_order, fmt):
    res = load_tfds(NAME, "train", data_dir=dirs[fmt])
    assert res.examples == _expected(read_order)
    assert res.skipped == 2
    assert res.problems == [f"{NAME}/train: row {read_order.index(uid) + 1}: {msg}"
                            for uid, msg in sorted(BAD.items(),
                                                   key=lambda kv: read_order.index(kv[0]))]
    # deterministic: a second read gives the same list
    assert load_tfds(NAME, "train", data_dir=dirs[fmt]) == res


@pytest.mark.parametrize("fmt", FORMATS)
def test_sliced_split_and_limit(dirs, read_order, fmt):
    # rows 3..8 of read order, across the two shards (5 + 6 rows)
    res = load_tfds(NAME, "train[3:9]", FieldMap(id="uid"), data_dir=dirs[fmt],
                    on_bad_row="skip")
    want = [u for u in read_order[3:9] if u not in BAD]
    assert [e["id"] for e in res.examples] == want
    assert res.skipped == len(read_order[3:9]) - len(want)

    res = load_tfds(NAME, "train", FieldMap(id="uid"), data_dir=dirs[fmt], limit=4)
    assert [e["id"] for e in res.examples] == [u for u in read_order[:4] if u not in BAD]
    assert load_tfds(NAME, "train", data_dir=dirs[fmt], limit=0).examples == []


def test_answer_from_solution_and_other_fields(dirs, read_order):
    d = dirs["array_record"]
    res = load_tfds(NAME, "train", FieldMap(answer="ignored-by-answer_from_solution",
                                            solution="solution", answer_from_solution=True,
                                            id="uid"), data_dir=d)
    got = {e["id"]: e for e in res.examples}
    assert got["r0"]["answer"] == "72" and got["r0"]["solution"] == GSM_SOLUTION
    assert got["r6"]["answer"] == "1234"  # thousands separator dropped
    assert got["r1"] == {"id": "r1", "question": "What is 3 + 101?", "answer": "104",
                         "solution": "3 + 101 = 104\n#### 104"}
    assert set(got) == {r["uid"] for r in ROWS} - set(BAD) - {"r8"}
    assert res.skipped == 3
    assert any(p.endswith("field 'solution' has no final answer after '####'")
               and p.startswith(f"{NAME}/train: row {read_order.index('r8') + 1}: ")
               for p in res.problems)

    # a numeric (int64) feature as the answer; nested features are named "outer/inner"
    res = load_tfds(NAME, "train", FieldMap(answer="meta/level", solution="solution", id="uid"),
                    data_dir=d)
    assert {e["id"]: e["answer"] for e in res.examples}["r7"] == "70"


def test_error_mode_raises_at_first_bad_row(dirs, read_order):
    first_bad = min(BAD, key=read_order.index)
    with pytest.raises(DataFormatError) as err:
        load_tfds(NAME, "train", data_dir=dirs["tfrecord"], on_bad_row="error")
    row = read_order.index(first_bad) + 1
    assert str(err.value) == f"{NAME}/train: row {row}: {BAD[first_bad]}"
    assert err.value.path == f"{NAME}/train" and err.value.line == row
    with pytest.raises(ValueError, match="on_bad_row"):
        load_tfds(NAME, "train", data_dir=dirs["tfrecord"], on_bad_row="ignore")


def test_not_prepared_gives_a_clear_error(dirs, tmp_path, offline):
    empty = str(tmp_path / "nothing_here")
    for name in (NAME, "gsm8k", "gsm8k/main:1.0.0"):
        with pytest.raises(DatasetNotPreparedError) as err:
            load_tfds(name, "train", data_dir=empty)
        msg = str(err.value)
        assert repr(name) in msg and repr(empty) in msg
        base = name.split(":")[0]
        assert f"tfds build {base} --data_dir {empty}" in msg and "copy" in msg
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(DatasetNotPreparedError, match="not prepared"):  # wrong version
        load_tfds(f"{NAME}:2.0.0", "train", data_dir=dirs["array_record"])


def test_wrong_split_or_field_is_a_clear_error(dirs):
    d = dirs["parquet"]
    with pytest.raises(ValueError, match=r"no split 'validation'.*\['train'\]"):
        load_tfds(NAME, "validation", data_dir=d)
    with pytest.raises(ValueError, match=r"no feature\(s\) \['problem'\].*'question'"):
        load_tfds(NAME, "train", FieldMap(question="problem"), data_dir=d)
    with pytest.raises(ValueError, match="limit"):
        load_tfds(NAME, "train", data_dir=d, limit=-1)


def test_damaged_files_raise(dirs, tmp_path):
    import shutil
    from pathlib import Path

    d = tmp_path / "copy"
    shutil.copytree(dirs["tfrecord"], d)
    shard = sorted(Path(d).rglob("*.tfrecord-00001-of-00002"))[0]
    shard.write_bytes(shard.read_bytes()[:-7])  # truncate the last record
    with pytest.raises(OSError, match="truncated TFRecord"):
        load_tfds(NAME, "train", data_dir=str(d))

    # a shard with fewer rows than the dataset info says (as TFDS's parquet writer can make)
    import pyarrow.parquet as pq

    d = tmp_path / "pq"
    shutil.copytree(dirs["parquet"], d)
    shard = sorted(Path(d).rglob("*.parquet-00000-of-00002"))[0]
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, table.num_rows - 1), shard)
    with pytest.raises(OSError, match=f"has {table.num_rows - 1} records but the dataset info"):
        load_tfds(NAME, "train", data_dir=str(d))
    assert len(load_tfds(NAME, f"train[:{table.num_rows - 1}]", data_dir=str(d)).examples) > 0


def test_examples_feed_prompt_stream_shards(dirs):
    examples = load_tfds(NAME, "train", data_dir=dirs["array_record"]).examples
    assert len(examples) == 9
    shards = [PromptStream(examples, batch_size=2, seed=3, shard_index=i, shard_count=2)
              for i in range(2)]
    epoch = [[ex["id"] for _ in range(3) for ex in s.next_batch()][:s.examples_per_epoch]
             for s in shards]
    assert sorted(s.examples_per_epoch for s in shards) == [4, 5]
    assert set(epoch[0]).isdisjoint(epoch[1])
    assert sorted(epoch[0] + epoch[1]) == sorted(e["id"] for e in examples)


def test_importing_the_package_does_not_import_tfds_or_tensorflow(dirs):
    code = ("import sys; "
            "import amrsd_jax, amrsd_jax.data; "
            "assert 'tensorflow_datasets' not in sys.modules; "
            f"r = amrsd_jax.data.load_tfds({NAME!r}, 'train', data_dir={dirs['tfrecord']!r}); "
            "assert len(r.examples) == 9, r; "
            "assert 'tensorflow_datasets' in sys.modules; "
            "assert 'tensorflow' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
