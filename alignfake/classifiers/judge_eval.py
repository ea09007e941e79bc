"""``alignfake judge-eval``: score a human-labelled set of scratchpads with an AF-reasoning judge and print
AUROC (from the vote share), accuracy at the threshold and the confusion matrix, so a judge model can be
checked before it is trusted (the paper: AUROC 0.92 on 106 labelled scratchpads).

Labels file: ``.csv``, ``.jsonl`` or ``.parquet`` with one row per scratchpad and the columns

``scratchpad``
    the model's reasoning text (another column with ``--text-column``);
``label``
    the human label, 1 = alignment-faking reasoning, 0 = not (``true``/``false`` accepted too; another column
    with ``--label-column``);
``id`` (optional)
    a row identifier, kept in ``--scores-out``.

Judge: ``--judge`` is a YAML file holding an AF judge spec (the ``judges.af_reasoning`` mapping of an
experiment: ``kind: llm``, ``model``, ``provider``, ``base_url``, ``votes``, ``threshold``, ...), or an
Experiment file (its ``spec.judges.af_reasoning`` is used), or ``PROVIDER:MODEL`` (e.g. ``openai:gpt-4o``).
``--set key=value`` overrides any field (``--set votes=5 --set base_url=http://localhost:8000/v1``).
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import AlignfakeError, DataError, SpecError

if TYPE_CHECKING:
    from .metrics import BinaryReport

PROVIDERS = ("openai", "anthropic", "transformers", "vllm", "mock")


@dataclass(frozen=True)
class LabelledText:
    id: str
    text: str
    label: int


@dataclass
class JudgeEvalResult:
    report: BinaryReport | None
    """None when no example got a valid verdict."""
    rows: list[LabelledText]
    shares: list[float | None]
    """The judge's yes-share per row; None where its answer stayed invalid."""
    invalid: list[str]
    """Reasons of the invalid verdicts, one per invalid row."""
    tag: str


# ----------------------------------------------------------------------------------------------- labels


def _label(value: Any, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return int(value.strip().lower() in ("1", "true"))
    raise DataError(f"{where}: label must be 0 or 1 (or true/false), got {value!r}")


def load_labels(path: str | Path, text_column: str = "scratchpad", label_column: str = "label") -> list[LabelledText]:
    """Rows of a labels file (see the module docstring); DataError naming the file and line on a bad row."""
    p = Path(path)
    suffix = p.suffix.lower()
    records: list[tuple[str, dict[str, Any]]] = []  # (where, row)
    try:
        if suffix in (".jsonl", ".ndjson"):
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{n}: not valid JSON: {e.msg}") from None
                if not isinstance(row, dict):
                    raise DataError(f"{p}:{n}: expected a JSON object")
                records.append((f"{p}:{n}", row))
        elif suffix == ".csv":
            with p.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                for row in reader:
                    records.append((f"{p}:{reader.line_num}", dict(row)))
        elif suffix in (".parquet", ".pq"):
            import pandas as pd

            frame = pd.read_parquet(p)
            for n, row in enumerate(frame.to_dict(orient="records"), start=1):
                records.append((f"{p} row {n}", row))
        else:
            raise DataError(f"{p}: unsupported labels file type {suffix or '(none)'}; use .csv, .jsonl or .parquet")
    except FileNotFoundError:
        raise DataError(f"{p}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text: {e}") from None
    out = []
    for i, (where, row) in enumerate(records):
        for col in (text_column, label_column):
            if col not in row:
                raise DataError(f"{where}: missing column {col!r} (columns: {', '.join(map(str, row))})")
        text = row[text_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: column {text_column!r} must be non-empty text")
        rid = row.get("id")
        out.append(LabelledText(id=str(rid) if rid not in (None, "") else str(i), text=text,
                                label=_label(row[label_column], where)))
    if not out:
        raise DataError(f"{p}: no labelled rows")
    return out


# ----------------------------------------------------------------------------------------------- judge spec


def _parse_value(raw: str) -> Any:
    import yaml

    return yaml.safe_load(raw)


def load_judge_spec(judge: str, overrides: tuple[str, ...] = ()) -> Any:
    """An AFJudgeSpec from a YAML file, an Experiment file or ``PROVIDER:MODEL``, with ``key=value``
    overrides."""
    import yaml
    from pydantic import ValidationError

    from ..spec import AFJudgeSpec

    path = Path(judge).expanduser()
    data: dict[str, Any]
    source = judge
    if path.is_file():
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise SpecError(judge, [f"not valid YAML: {e}"]) from None
        if isinstance(doc, dict) and doc.get("kind") == "Experiment":
            doc = ((doc.get("spec") or {}).get("judges") or {}).get("af_reasoning") or {}
            source = f"{judge}: spec.judges.af_reasoning"
        if not isinstance(doc, dict):
            raise SpecError(judge, ["expected a mapping (an AF judge spec or an Experiment)"])
        data = dict(doc)
    elif ":" in judge and judge.split(":", 1)[0] in PROVIDERS and judge.split(":", 1)[1]:
        provider, model = judge.split(":", 1)
        data = {"provider": provider, "model": model}
    else:
        raise SpecError("--judge", [f"{judge!r} is neither a file nor PROVIDER:MODEL (providers: "
                                    f"{', '.join(PROVIDERS)})"])
    for item in overrides:
        if "=" not in item:
            raise SpecError("--set", [f"{item!r}: expected key=value"])
        key, raw = item.split("=", 1)
        data[key.strip()] = _parse_value(raw)
    data.setdefault("kind", "llm")
    try:
        spec = AFJudgeSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(source, [f"{'.'.join(map(str, err['loc'])) or '(root)'}: {err['msg']}"
                                 for err in e.errors()]) from None
    if spec.kind != "llm":
        raise SpecError(source, ["kind: judge-eval evaluates an LLM judge; set kind: llm"])
    return spec


# ----------------------------------------------------------------------------------------------- evaluation


def evaluate_judge(rows: list[LabelledText], spec: Any, **engine_options: Any) -> JudgeEvalResult:
    """Judge every row's text as a scratchpad and compare the AF vote share with the human labels."""
    from ..records import Completion
    from .judges import create_judge
    from .metrics import binary_report

    completions = [
        Completion(id=r.id, model="judge-eval", query_id=r.id, tier="n/a", sample=0, query="", completion=r.text,
                   finish_reason="stop", scratchpad=r.text, output="")
        for r in rows
    ]
    judge = create_judge("af_reasoning", spec, **engine_options)
    try:
        verdicts = judge.classify(completions)
    finally:
        judge.close()
    shares = [v.score if v.valid else None for v in verdicts]
    invalid = [f"{r.id}: {v.reason}" for r, v in zip(rows, verdicts, strict=True) if not v.valid]
    scored = [(r.label, s) for r, s in zip(rows, shares, strict=True) if s is not None]
    report = binary_report([y for y, _ in scored], [s for _, s in scored], spec.threshold) if scored else None
    return JudgeEvalResult(report=report, rows=rows, shares=shares, invalid=invalid, tag=judge.tag)


def format_report(result: JudgeEvalResult, spec: Any) -> str:
    lines = [f"judge: {result.tag} (votes {spec.votes}, temperature {spec.temperature}, threshold {spec.threshold})"]
    lines.append(f"examples: {len(result.rows)}; invalid judge answers (excluded): {len(result.invalid)}")
    for reason in result.invalid[:5]:
        lines.append(f"  invalid {reason}")
    if len(result.invalid) > 5:
        lines.append(f"  ... and {len(result.invalid) - 5} more")
    r = result.report
    if r is None:
        lines.append("no valid verdicts: nothing to score")
        return "\n".join(lines)
    auroc = "undefined (only one class among the scored examples)" if r.auroc != r.auroc else f"{r.auroc:.4f}"
    (tn, fp), (fn, tp) = r.confusion.tolist()
    lines += [
        f"scored: {r.n} (label 1: {r.positives}, label 0: {r.n - r.positives})",
        f"AUROC (vote share): {auroc}",
        f"accuracy at threshold {r.threshold}: {r.accuracy:.4f}",
        "confusion matrix (rows: human label; columns: judge):",
        f"{'':>10}{'judge 0':>10}{'judge 1':>10}",
        f"{'label 0':>10}{tn:>10}{fp:>10}",
        f"{'label 1':>10}{fn:>10}{tp:>10}",
    ]
    return "\n".join(lines)


@click.command("judge-eval")
@click.option("--labels", "labels_file", required=True, type=click.Path(dir_okay=False),
              help="Human labels: .csv/.jsonl/.parquet with columns scratchpad, label (0/1), optional id.")
@click.option("--judge", required=True, metavar="FILE|PROVIDER:MODEL",
              help="AF judge spec YAML, an Experiment file, or PROVIDER:MODEL (e.g. openai:gpt-4o).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a judge spec field, e.g. --set votes=5 --set base_url=http://localhost:8000/v1.")
@click.option("--text-column", default="scratchpad", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Response cache of HTTP judges (default ~/.cache/alignfake/responses).")
@click.option("--no-cache", is_flag=True, help="Do not read or write the response cache.")
@click.option("--max-tokens", type=click.IntRange(16, 32768), default=1024, show_default=True,
              help="Token budget of one judge answer (reasoning plus the verdict block).")
@click.option("--scores-out", type=click.Path(dir_okay=False), default=None,
              help="Write id, label, share per row to this CSV.")
def judge_eval_command(labels_file: str, judge: str, overrides: tuple[str, ...], text_column: str,
                       label_column: str, cache_dir: str | None, no_cache: bool, max_tokens: int,
                       scores_out: str | None) -> None:
    """Check an AF-reasoning judge against human labels: AUROC, accuracy, confusion matrix."""
    try:
        spec = load_judge_spec(judge, overrides)
        rows = load_labels(labels_file, text_column, label_column)
        options: dict[str, Any] = {"max_tokens": max_tokens}
        if spec.provider in ("openai", "anthropic"):
            if no_cache:
                options["cache"] = False
            elif cache_dir:
                options["cache_dir"] = cache_dir
        result = evaluate_judge(rows, spec, **options)
    except AlignfakeError as e:
        # As the CLI group does for every command: one line per problem, the error's exit code.
        lines = [f"{e.source}: {p}" for p in e.problems] if isinstance(e, SpecError) else [f"error: {e}"]
        for line in lines:
            click.echo(line, err=True)
        sys.exit(e.exit_code)
    if scores_out:
        with open(scores_out, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "label", "share"])
            for r, s in zip(result.rows, result.shares, strict=True):
                w.writerow([r.id, r.label, "" if s is None else s])
    click.echo(format_report(result, spec))
    if result.report is None:
        raise click.ClickException("no valid judge verdicts")


__all__ = ["JudgeEvalResult", "LabelledText", "evaluate_judge", "judge_eval_command", "load_judge_spec",
           "load_labels"]
