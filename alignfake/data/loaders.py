"""Queries and documents from JSONL, CSV, Parquet, ``s3://`` objects, Hugging Face datasets, or the small
sets shipped with alignfake (``builtin:NAME``).

Every row gets a stable id: the ``id`` column when the source has one, else its 0-based position in the source.
A malformed row is reported with its file and line number (Parquet and Hugging Face: row number). In strict mode
(queries) the first malformed row is an error; in lenient mode (documents) malformed rows are dropped and
counted, and the caller reports the counts.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import DataError
from ..spec import DataSource

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Row:
    id: str
    text: str


@dataclass
class LoadReport:
    """What a lenient load kept and dropped, with the first few reasons."""

    kept: int = 0
    malformed: int = 0
    problems: list[str] = field(default_factory=list)

    def add_problem(self, msg: str) -> None:
        self.malformed += 1
        if len(self.problems) < 20:
            self.problems.append(msg)


def builtin_path(name: str) -> Path:
    """Path of a dataset shipped as package data (``builtin:demo_queries`` -> data/demo_queries.jsonl)."""
    base = resources.files("alignfake") / "data"
    for ext in (".jsonl", ".csv", ".parquet"):
        p = base / f"{name}{ext}"
        if p.is_file():
            return Path(str(p))
    available = sorted(p.name.rsplit(".", 1)[0] for p in base.iterdir() if p.name.endswith((".jsonl", ".csv")))
    raise DataError(f"unknown builtin dataset {name!r}; available: {', '.join(available)}")


def load_rows(
    src: DataSource, *, field_path: str = "dataset", strict: bool = True, report: LoadReport | None = None
) -> list[Row]:
    """Load the rows of ``src`` (its ``column``; first ``limit`` good rows). ``field_path`` names the spec
    field in error messages."""
    report = report if report is not None else LoadReport()
    source = src.source
    if source.startswith("builtin:"):
        path = builtin_path(source.split(":", 1)[1])
        rows = _load_file(path, src.column, strict, report, label=source)
    elif source.startswith("s3://"):
        rows = _load_bytes(_read_s3(source), source, src.column, strict, report)
    elif Path(source).exists():
        rows = _load_file(Path(source), src.column, strict, report, label=source)
    elif _HF_ID.match(source) and not source.endswith((".jsonl", ".json", ".csv", ".parquet")):
        rows = _load_hf(source, src.split, src.column, strict, report, field_path)
    else:
        raise DataError(f"{field_path}.source: file not found: {source}")
    if src.limit is not None:
        rows = rows[: src.limit]
    report.kept = len(rows)
    if not rows:
        raise DataError(f"{field_path}: {source} has no usable rows in column {src.column!r}")
    return rows


def _fail(strict: bool, report: LoadReport, msg: str) -> None:
    if strict:
        raise DataError(msg)
    report.add_problem(msg)


def _check_text(value: object, where: str, column: str, strict: bool, report: LoadReport) -> str | None:
    if value is None:
        _fail(strict, report, f"{where}: missing column {column!r}")
        return None
    if not isinstance(value, str):
        _fail(strict, report, f"{where}: column {column!r} must be text, got {type(value).__name__}")
        return None
    if not value.strip():
        _fail(strict, report, f"{where}: column {column!r} is empty")
        return None
    return value


def _row_id(raw: object, index: int) -> str:
    return str(raw) if raw not in (None, "") else f"{index:05d}"


def _add_row(rows: list[Row], ids: set[str], raw_id: object, index: int, text: str, where: str, strict: bool,
             report: LoadReport) -> None:
    rid = _row_id(raw_id, index)
    if rid in ids:
        _fail(strict, report, f"{where}: duplicate id {rid!r}")
        return
    ids.add(rid)
    rows.append(Row(rid, text))


def _load_file(path: Path, column: str, strict: bool, report: LoadReport, label: str) -> list[Row]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{label}: cannot read: {e}") from None
    return _load_bytes(data, label, column, strict, report, suffix=path.suffix.lower())


def _load_bytes(
    data: bytes, label: str, column: str, strict: bool, report: LoadReport, suffix: str | None = None
) -> list[Row]:
    suffix = suffix or Path(label).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _load_jsonl(data, label, column, strict, report)
    if suffix == ".csv":
        return _load_csv(data, label, column, strict, report)
    if suffix == ".parquet":
        return _load_parquet(data, label, column, strict, report)
    raise DataError(f"{label}: unsupported file type {suffix or '(none)'}; use .jsonl, .csv or .parquet")


def _load_jsonl(data: bytes, label: str, column: str, strict: bool, report: LoadReport) -> list[Row]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{label}: not UTF-8 text (byte {e.start})") from None
    rows: list[Row] = []
    ids: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{label}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            _fail(strict, report, f"{where}: invalid JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(obj, dict):
            _fail(strict, report, f"{where}: expected a JSON object, got {type(obj).__name__}")
            continue
        value = _check_text(obj.get(column), where, column, strict, report)
        if value is not None:
            _add_row(rows, ids, obj.get("id"), len(rows) + report.malformed, value, where, strict, report)
    return rows


def _load_csv(data: bytes, label: str, column: str, strict: bool, report: LoadReport) -> list[Row]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{label}: not UTF-8 text (byte {e.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{label}: empty file (expected a header line with column {column!r})") from None
    except csv.Error as e:
        raise DataError(f"{label}, line 1: {e}") from None
    if column not in header:
        raise DataError(f"{label}, line 1: no column {column!r} in header {header}")
    col, id_col = header.index(column), (header.index("id") if "id" in header else None)
    rows: list[Row] = []
    ids: set[str] = set()
    while True:
        start = reader.line_num + 1
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{label}, line {start}: {e}") from None
        if not rec:
            continue
        where = f"{label}, line {start}"
        if len(rec) != len(header):
            _fail(strict, report, f"{where}: expected {len(header)} fields, got {len(rec)}")
            continue
        value = _check_text(rec[col], where, column, strict, report)
        if value is not None:
            raw_id = rec[id_col] if id_col is not None else None
            _add_row(rows, ids, raw_id, len(rows) + report.malformed, value, where, strict, report)
    return rows


def _load_parquet(data: bytes, label: str, column: str, strict: bool, report: LoadReport) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise DataError(f"{label}: not a readable Parquet file: {e}") from None
    if column not in table.column_names:
        raise DataError(f"{label}: no column {column!r}; columns: {table.column_names}")
    values = table.column(column).to_pylist()
    ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * len(values)
    return _rows_from_values(values, ids, label, column, strict, report)


def _rows_from_values(values, ids, label, column, strict, report) -> list[Row]:  # type: ignore[no-untyped-def]
    rows: list[Row] = []
    seen: set[str] = set()
    for i, (value, raw_id) in enumerate(zip(values, ids, strict=True)):
        where = f"{label}, row {i}"
        text = _check_text(value, where, column, strict, report)
        if text is not None:
            _add_row(rows, seen, raw_id, i, text, where, strict, report)
    return rows


def _load_hf(
    name: str, split: str, column: str, strict: bool, report: LoadReport, field_path: str
) -> list[Row]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{field_path}.source: {name} looks like a Hugging Face dataset id, but the `datasets` package is "
            "not installed (pip install 'alignfake[local]'), and no local file has that name"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - network, auth and missing-dataset errors all land here
        raise DataError(
            f"{field_path}.source: cannot load Hugging Face dataset {name!r} (split {split!r}): {e}. Offline? "
            "Point source at a local .jsonl/.csv/.parquet file instead."
        ) from None
    if column not in ds.column_names:
        raise DataError(f"{field_path}.column: dataset {name} has no column {column!r}; columns: {ds.column_names}")
    ids = ds["id"] if "id" in ds.column_names else [None] * len(ds)
    return _rows_from_values(ds[column], ids, name, column, strict, report)


def _read_s3(uri: str) -> bytes:
    import boto3  # core dependency, imported only when an s3:// dataset is used

    bucket, _, key = uri[5:].partition("/")
    try:
        return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{uri}: cannot read: {e}") from None
