"""File-level faults get the same one-line errors as row-level faults (`file:0: -: problem`), what real
tools write is accepted, and rows that carry no training signal are refused unless skipped."""

import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.data.reader import DataError, load
from stages.settings.data import DatasetConfig

ROOT = Path(__file__).resolve().parents[1]
PAIR = {"prompt": "describe the ocean", "chosen": "lovely fish", "rejected": "sad bus"}


def problems(path: Path, kind: str = "preferences", **kw) -> list[str]:
    with pytest.raises(DataError) as e:
        load(DatasetConfig(path=str(path), kind=kind, **kw))
    return e.value.problems


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_corrupt_and_truncated_gzip(tmp_path):
    good = gzip.compress(jsonl([PAIR] * 50))
    truncated = tmp_path / "pairs.jsonl.gz"
    truncated.write_bytes(good[: len(good) // 2])
    (p,) = problems(truncated)
    assert p.startswith(f"{truncated}:0: -: corrupt or truncated gzip (")
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(good[:10] + b"\x00garbage" * 20)
    (p,) = problems(corrupt)
    assert p.startswith(f"{corrupt}:0: -: corrupt or truncated gzip (")
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_bytes(jsonl([PAIR]))
    assert problems(plain) == [f"{plain}:0: -: is not gzip data, though its name ends in .gz"]


def test_corrupt_parquet_and_files_that_are_not_their_extension(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([PAIR] * 20), buf)
    data = buf.getvalue()
    corrupt = tmp_path / "pairs.parquet"
    corrupt.write_bytes(data[:4] + b"\x00" * 64 + data[-8:])  # header and footer magic, nothing between
    (p,) = problems(corrupt)
    assert p.startswith(f"{corrupt}:0: -: corrupt Parquet file (")
    json_named_parquet = tmp_path / "json.parquet"
    json_named_parquet.write_bytes(jsonl([PAIR]))
    assert problems(json_named_parquet) == [
        f"{json_named_parquet}:0: -: is not a Parquet file (no PAR1 header), though its name ends in .parquet"
    ]
    parquet_named_jsonl = tmp_path / "pairs.jsonl"
    parquet_named_jsonl.write_bytes(data)
    assert problems(parquet_named_jsonl) == [
        f"{parquet_named_jsonl}:0: -: holds Parquet data, not what its extension says (jsonl)"
    ]
    array_named_jsonl = tmp_path / "array.jsonl"
    array_named_jsonl.write_text(json.dumps([PAIR, PAIR], indent=1))
    assert problems(array_named_jsonl) == [
        f"{array_named_jsonl}:0: -: holds one JSON array, not JSON Lines; name it .json"
    ]
    lines_named_json = tmp_path / "lines.json"
    lines_named_json.write_bytes(jsonl([PAIR, PAIR]))
    assert problems(lines_named_json) == [
        f"{lines_named_json}:0: -: holds JSON Lines, not one JSON array; name it .jsonl"
    ]


def test_a_directory_where_a_file_was_expected(tmp_path):
    folder = tmp_path / "pairs.jsonl"
    folder.mkdir()
    assert problems(folder) == [f"{folder}:0: -: is a directory, expected a file"]


def test_an_unreadable_file(tmp_path):
    """Permission denied, for real: as root (CI) the read happens in a forked child that became `nobody`."""
    public = Path(os.environ.get("TMPDIR", "/tmp")) / f"alignflow-unreadable-{os.getpid()}"
    public.mkdir(exist_ok=True)
    public.chmod(0o755)
    path = public / "pairs.jsonl"
    path.write_bytes(jsonl([PAIR]))
    path.chmod(0o000)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, try the load, report the message
        try:
            if os.geteuid() == 0:
                os.setuid(65534)
            load(DatasetConfig(path=str(path), kind="preferences"))
            message = "loaded"
        except DataError as e:
            message = str(e)
        except BaseException as e:  # noqa: BLE001 (reported to the parent, which fails the test)
            message = f"{type(e).__name__}: {e}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    message = os.read(read, 65536).decode()
    os.waitpid(pid, 0)
    path.chmod(0o644)
    path.unlink()
    public.rmdir()
    assert message == f"{path}:0: -: cannot be read: permission denied"


def test_byte_order_mark_crlf_and_a_trailing_blank_line_are_accepted(tmp_path):
    bom = b"\xef\xbb\xbf"
    lines = tmp_path / "pairs.jsonl"
    lines.write_bytes(bom + b"".join(json.dumps(r).encode() + b"\r\n" for r in [PAIR, PAIR]) + b"\r\n")
    assert len(load(DatasetConfig(path=str(lines), kind="preferences")).rows) == 2
    table = tmp_path / "pairs.csv"
    table.write_bytes(bom + b"prompt,chosen,rejected\r\ndescribe the ocean,lovely fish,sad bus\r\n\r\n")
    (row,) = load(DatasetConfig(path=str(table), kind="preferences")).rows
    assert row["chosen"] == "lovely fish" and row["rejected"] == "sad bus"
    array = tmp_path / "pairs.json"
    array.write_bytes(bom + json.dumps([PAIR]).encode().replace(b",", b",\r\n") + b"\r\n\r\n")
    assert len(load(DatasetConfig(path=str(array), kind="preferences")).rows) == 1


def test_rows_without_training_signal_are_refused_by_default_and_counted_when_skipped(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(jsonl([PAIR, {**PAIR, "rejected": "lovely fish"}, PAIR]))
    assert problems(pairs) == [f"{pairs}:2: rejected: same as chosen: the pair carries no preference"]
    ranked = tmp_path / "ranked.jsonl"
    ranked.write_bytes(
        jsonl(
            [
                {"prompt": "q", "responses": ["a", "b", "c"], "ranks": [0, 1, 2]},
                {"prompt": "q", "responses": ["a", "b", "c"], "ranks": [1, 1, 1]},
                {"prompt": "q", "responses": ["a", "", "c"], "ranks": [0, 1, 2]},
                {"prompt": "q", "responses": ["a", "b", "c"], "scores": [0.5, 0.5, 0.5]},
            ]
        )
    )
    assert problems(ranked, kind="rankings") == [
        f"{ranked}:2: ranks: every response ties: the ranking carries no preference",
        f"{ranked}:3: responses[1]: empty",
        f"{ranked}:4: ranks: every response ties: the ranking carries no preference",
    ]
    skipped = load(DatasetConfig(path=str(ranked), kind="rankings", on_error="skip", max_bad_fraction=0.8))
    assert (len(skipped.rows), skipped.bad) == (1, 3)
    kept = load(DatasetConfig(path=str(ranked), kind="rankings", keep_degenerate=True))
    assert len(kept.rows) == 4


def test_the_cli_names_a_corrupt_data_file_in_one_line_before_any_compute(tmp_path):
    bad = tmp_path / "pairs.jsonl.gz"
    bad.write_bytes(gzip.compress(jsonl([PAIR] * 20))[:40])
    art = tmp_path / "artifacts"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.align", f"artifacts_dir={art}", "data=files", f"data.comparisons.path={bad}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(f"error: {bad}:0: -: corrupt or truncated gzip (")
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (art / "mlflow.db").exists() and not (art / "prepare").exists()
