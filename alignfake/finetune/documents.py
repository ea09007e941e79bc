"""The fine-tuning documents: loaded leniently, measured with the model's tokenizer, filtered, counted.

A document is trained on as one sequence: the tokenizer's encoding of its text (with the tokenizer's special
tokens, e.g. a BOS) followed by the end-of-sequence token. Documents whose sequence is longer than
``max_doc_tokens`` are dropped (the paper kept documents under 1024 tokens), then the first ``limit`` of the
rest are kept. The counts (kept, dropped for length, dropped as malformed, beyond the limit) are logged and
recorded in the adapter's commit marker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..data.loaders import LoadReport, Row
from ..errors import AlignfakeError

# Texts -> sequence lengths (tokens, including special tokens and the EOS appended for training).
TokenCounter = Callable[[Sequence[str]], list[int]]


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    tokens: int


@dataclass
class DocumentReport:
    """What the document filter kept and dropped."""

    read: int = 0
    """Rows read from the source, malformed ones included."""
    kept: int = 0
    dropped_length: int = 0
    """Longer than ``max_doc_tokens``."""
    dropped_malformed: int = 0
    """Unparseable rows, missing or empty text (the loader's count)."""
    dropped_limit: int = 0
    """Well-formed and short enough, but beyond ``limit``."""
    max_doc_tokens: int = 0
    tokens: int = 0
    """Tokens in the kept documents (one epoch)."""
    longest_kept: int = 0
    problems: list[str] = field(default_factory=list)
    """The first malformed rows, with file and line."""

    def summary(self) -> str:
        s = (f"{self.kept} documents kept ({self.tokens} tokens), {self.dropped_length} dropped as longer than "
             f"{self.max_doc_tokens} tokens, {self.dropped_malformed} dropped as malformed")
        if self.dropped_limit:
            s += f", {self.dropped_limit} beyond the limit"
        return s

    def as_meta(self) -> dict[str, Any]:
        d = asdict(self)
        d["problems"] = d["problems"][:5]
        return d


def filter_documents(
    rows: Sequence[Row], load_report: LoadReport, count_tokens: TokenCounter, *, max_doc_tokens: int, limit: int
) -> tuple[list[Document], DocumentReport]:
    """Drop documents longer than ``max_doc_tokens`` tokens, keep at most ``limit``; count everything."""
    report = DocumentReport(max_doc_tokens=max_doc_tokens, dropped_malformed=load_report.malformed,
                            problems=list(load_report.problems))
    report.read = len(rows) + load_report.malformed
    lengths = count_tokens([r.text for r in rows]) if rows else []
    kept: list[Document] = []
    for row, n in zip(rows, lengths, strict=True):
        if n > max_doc_tokens:
            report.dropped_length += 1
        elif len(kept) >= limit:
            report.dropped_limit += 1
        else:
            kept.append(Document(row.id, row.text, n))
    report.kept = len(kept)
    report.tokens = sum(d.tokens for d in kept)
    report.longest_kept = max((d.tokens for d in kept), default=0)
    return kept, report


def tokenizer_counter(tokenizer: Any, batch_size: int = 1024) -> TokenCounter:
    """A TokenCounter for a Hugging Face tokenizer: the lengths of :func:`encode_documents`, batched."""

    def count(texts: Sequence[str]) -> list[int]:
        out: list[int] = []
        for i in range(0, len(texts), batch_size):
            out.extend(len(ids) for ids in encode_documents(tokenizer, texts[i : i + batch_size]))
        return out

    return count


def encode_documents(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Training sequences: the tokenizer's encoding (with its special tokens) ending with one EOS token."""
    eos = tokenizer.eos_token_id
    if isinstance(eos, list):
        eos = eos[0]
    if eos is None:
        raise AlignfakeError(
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos_token; documents need an "
            "end-of-sequence token"
        )
    enc = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    return [ids if ids and ids[-1] == eos else [*ids, eos] for ids in enc]
