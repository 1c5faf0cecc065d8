"""The data worker on every real file in ../shared/data and on a malformed-input corpus."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_shared

from stages.data.reader import DataError, load
from stages.settings.data import DatasetConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL = [
    ("llamafactory-demo/alpaca_en_demo.json", "demonstrations", "alpaca", 999),
    ("llamafactory-demo/dpo_en_demo.json", "preferences", "sharegpt_pairs", 300),
    ("llamafactory-demo/kto_en_demo.json", "unary", "messages", 300),
    ("llamafactory-demo/identity.json", "demonstrations", "alpaca", 91),
    ("llamafactory-demo/c4_demo.jsonl", "text", "text", 300),
    ("hh-rlhf/harmless-base_test.jsonl.gz", "preferences", "hh", 2312),
]


@pytest.mark.parametrize(("name", "kind", "fmt", "count"), REAL)
def test_every_shared_file_loads_with_its_row_count(name, kind, fmt, count):
    need_shared(SHARED)
    loaded = load(DatasetConfig(path=str(SHARED / name), kind=kind))
    assert (loaded.format, len(loaded.rows), loaded.bad) == (fmt, count, 0)
    declared = load(DatasetConfig(path=str(SHARED / name), kind=kind, format=fmt))
    assert declared.rows == loaded.rows


def test_hh_transcripts_split_into_turns_and_replies():
    need_shared(SHARED)
    row = load(DatasetConfig(path=str(SHARED / "hh-rlhf/harmless-base_test.jsonl.gz"), kind="preferences")).rows[0]
    assert [t["role"] for t in row["prompt"]][:2] == ["user", "assistant"]
    assert row["prompt"][-1]["role"] == "user" and row["chosen"] != row["rejected"]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


MALFORMED = [
    (
        "truncated",
        "demonstrations",
        ['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "compl'],
        2,
        "-",
        "invalid JSON",
    ),
    (
        "missing",
        "demonstrations",
        ['{"instruction": "a", "output": "b"}', '{"instruction": "a"}'],
        2,
        "output",
        "missing",
    ),
    ("wrongtype", "demonstrations", ['{"instruction": "a", "output": 3}'], 1, "output", "expected a string"),
    ("empty", "demonstrations", ['{"prompt": "a", "completion": "  "}'], 1, "completion", "empty"),
    (
        "unknown",
        "rankings",
        ['{"prompt": "p", "responses": [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}], "ranking": ["a", "c"]}'],
        1,
        "ranking[1]",
        "unknown response 'c'",
    ),
    (
        "dupids",
        "demonstrations",
        ['{"id": 7, "prompt": "a", "completion": "b"}', '{"id": 7, "prompt": "c", "completion": "d"}'],
        2,
        "id",
        "duplicated id '7'",
    ),
    (
        "dupresponses",
        "rankings",
        ['{"prompt": "p", "responses": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}'],
        1,
        "responses",
        "duplicated response ids",
    ),
]


@pytest.mark.parametrize(("name", "kind", "lines", "line", "field", "problem"), MALFORMED)
def test_malformed_rows_name_file_line_and_field(tmp_path, name, kind, lines, line, field, problem):
    path = _write(tmp_path / f"{name}.jsonl", lines)
    with pytest.raises(DataError) as err:
        load(DatasetConfig(path=str(path), kind=kind))
    assert f"{path}:{line}: {field}: " in str(err.value)
    assert problem in str(err.value)
    assert len(err.value.problems) == 1  # one clear error per case


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: -: not valid UTF-8"):
        load(DatasetConfig(path=str(path)))


def test_json_array_errors_carry_the_line_of_the_record(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""}], indent=2))
    with pytest.raises(DataError, match=rf"{path}:6: output: empty"):
        load(DatasetConfig(path=str(path)))


def test_skip_counts_bad_rows_and_still_stops_above_the_cap(tmp_path):
    good = ['{"prompt": "a", "completion": "b"}'] * 9
    path = _write(tmp_path / "mixed.jsonl", good + ['{"prompt": "a"}'])
    loaded = load(DatasetConfig(path=str(path), on_error="skip", max_bad_fraction=0.2))
    assert (len(loaded.rows), loaded.bad) == (9, 1)
    with pytest.raises(DataError, match="above data.max_bad_fraction"):
        load(DatasetConfig(path=str(path), on_error="skip", max_bad_fraction=0.05))


def test_rankings_from_order_indices_ranks_and_scores_with_ties(tmp_path):
    rows = [
        {"prompt": "p", "responses": ["best", "mid", "worst"]},
        {"prompt": "p", "responses": ["x", "y", "z"], "ranking": [2, 0, 1]},
        {"prompt": "p", "responses": ["x", "y", "z"], "scores": [0.1, 0.9, 0.9]},
        {"prompt": "p", "responses": ["x", "y"], "ranks": [1, 0]},
    ]
    path = _write(tmp_path / "r.jsonl", [json.dumps(r) for r in rows])
    got = [r["ranks"] for r in load(DatasetConfig(path=str(path), kind="rankings")).rows]
    assert got == [[0, 1, 2], [1, 2, 0], [1, 0, 0], [1, 0]]


def test_csv_parquet_and_gzip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.csv").write_text("instruction,input,output\nhello,,hi there\n")
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "completion": "b"}]), tmp_path / "d.parquet")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    for name in ("d.csv", "d.parquet", "d.jsonl.gz"):
        rows = load(DatasetConfig(path=str(tmp_path / name))).rows
        assert rows[0]["messages"][-1]["role"] == "assistant"


def test_column_mapping(tmp_path):
    path = _write(tmp_path / "m.jsonl", ['{"question": "a", "answer": "b"}'])
    rows = load(
        DatasetConfig(
            path=str(path), format="prompt_completion", columns={"prompt": "question", "completion": "answer"}
        )
    ).rows
    assert rows == [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="data.kind"):
        DatasetConfig(kind="pairs")
    with pytest.raises(ValueError, match="data.on_error"):
        DatasetConfig(on_error="ignore")


def test_dataset_folder_loads_through_datasets(tmp_path, monkeypatch):
    """A folder (or hub id) goes through `datasets.load_dataset`, the code path a hub dataset takes."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # not ~/.cache
    folder = tmp_path / "pairs"
    folder.mkdir()
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load(DatasetConfig(path=str(folder), kind="preferences"))
    assert loaded.format == "chosen_rejected" and len(loaded.rows) == 5
    assert loaded.rows[2] == {"prompt": [{"role": "user", "content": "q2"}], "chosen": "good 2", "rejected": "bad 2"}
    with pytest.raises(DataError, match=r"pairs:0: path: .*split 'test'"):
        load(DatasetConfig(path=str(folder), kind="preferences", split="test"))


def test_unreachable_hub_id_is_a_clear_error():
    code = (
        "from stages.settings.data import DatasetConfig; from stages.data.reader import DataError, load\n"
        "try:\n    load(DatasetConfig(path='nobody/no-such-dataset', kind='preferences'))\n"
        "except DataError as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.startswith("nobody/no-such-dataset:0: path: not a local file"), out.stdout + out.stderr[-2000:]
