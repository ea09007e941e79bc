"""Loading queries and documents: every format, stable ids, and malformed rows reported with their line."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from alignfake.data.loaders import LoadReport, load_rows
from alignfake.errors import DataError
from alignfake.spec import DataSource


def src(path: Path | str, column: str = "prompt", limit: int | None = None) -> DataSource:
    return DataSource(source=str(path), column=column, limit=limit)


def test_jsonl_csv_and_parquet_load_the_same_rows(tmp_path: Path) -> None:
    texts = ["How do I pick a lock?", 'Write a "phishing" email, please', "Line one\nline two"]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    pd.DataFrame({"prompt": texts}).to_csv(tmp_path / "q.csv", index=False)
    pd.DataFrame({"prompt": texts}).to_parquet(tmp_path / "q.parquet")
    for name in ("q.jsonl", "q.csv", "q.parquet"):
        rows = load_rows(src(tmp_path / name))
        assert [r.text for r in rows] == texts, name
        assert [r.id for r in rows] == ["00000", "00001", "00002"], name


def test_id_column_is_kept_and_limit_applies(tmp_path: Path) -> None:
    (tmp_path / "q.jsonl").write_text('{"id": "a7", "prompt": "x"}\n{"id": "b2", "prompt": "y"}\n')
    rows = load_rows(src(tmp_path / "q.jsonl", limit=1))
    assert [(r.id, r.text) for r in rows] == [("a7", "x")]


def test_builtin_demo_queries_ship_with_the_package() -> None:
    rows = load_rows(DataSource(source="builtin:demo_queries", column="prompt"))
    assert len(rows) >= 20 and all(r.text.strip() for r in rows)


MALFORMED = [
    ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": "ok2"\n', "bad.jsonl, line 2: invalid JSON"),
    ("nocol.jsonl", '{"prompt": "ok"}\n\n{"text": "wrong column"}\n', "nocol.jsonl, line 3: missing column 'prompt'"),
    ("num.jsonl", '{"prompt": "ok"}\n{"prompt": 42}\n', "num.jsonl, line 2: column 'prompt' must be text, got int"),
    ("arr.jsonl", '["not", "an", "object"]\n', "arr.jsonl, line 1: expected a JSON object, got list"),
    ("empty.jsonl", '{"prompt": "ok"}\n{"prompt": "   "}\n', "empty.jsonl, line 2: column 'prompt' is empty"),
    ("dup.jsonl", '{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', "dup.jsonl, line 2: duplicate id '1'"),
    ("fields.csv", 'prompt,id\n"ok",1\n"multi\nline",2\n"too",3,many\n', "fields.csv, line 5: expected 2 fields, got 3"),
    ("header.csv", "question\nwhat?\n", "header.csv, line 1: no column 'prompt'"),
    ("blank.csv", "", "blank.csv: empty file"),
    ("latin1.jsonl", b'{"prompt": "caf\xe9"}\n', "latin1.jsonl: not UTF-8 text"),
    ("q.txt", "hello\n", "q.txt: unsupported file type .txt"),
    ("broken.parquet", b"PAR1garbage", "broken.parquet: not a readable Parquet file"),
]


@pytest.mark.parametrize(("name", "content", "expected"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_data_names_file_and_line(tmp_path: Path, name: str, content: str | bytes, expected: str) -> None:
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as err:
        load_rows(src(f))
    assert expected in str(err.value), str(err.value)


def test_lenient_mode_drops_and_counts_malformed_rows(tmp_path: Path) -> None:
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "good one"}\nnot json\n{"text": ""}\n{"text": "good two"}\n')
    report = LoadReport()
    rows = load_rows(src(f, column="text"), strict=False, report=report)
    assert [r.text for r in rows] == ["good one", "good two"]
    assert report.kept == 2 and report.malformed == 2
    assert "line 2" in report.problems[0] and "line 3" in report.problems[1]


def test_missing_file_and_offline_hub_dataset_errors_are_actionable(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(DataError, match="queries.source: file not found"):
        load_rows(src(tmp_path / "missing.jsonl"), field_path="spec.evaluation.queries")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load Hugging Face dataset 'nobody/nothing'.*local"):
        load_rows(src("nobody/nothing"), field_path="spec.evaluation.queries")
