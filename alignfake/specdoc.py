"""Generate the README's spec reference from the pydantic models' field docstrings (one source of truth).

``python -m alignfake.specdoc`` prints it; ``--write README.md`` replaces the block between the markers."""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel

from .spec import Experiment

START, END = "<!-- spec-reference:start -->", "<!-- spec-reference:end -->"


def _models_in(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _type_name(annotation: object) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    text = text or str(annotation).replace("typing.", "").replace("alignfake.spec.", "")
    return text.replace("|", "\\|")


def reference() -> str:
    lines = ["| field | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str, seen: tuple[type, ...]) -> None:
        for name, field in model.model_fields.items():
            if name == "status":
                continue
            path = f"{prefix}.{name}" if prefix else name
            default = "required" if field.is_required() else repr(field.default)
            if isinstance(field.default, BaseModel):
                default = "(section)"
            doc = " ".join((field.description or "").split()).replace("|", "\\|")
            lines.append(f"| `{path}` | {_type_name(field.annotation)} | {default} | {doc} |")
            for sub in _models_in(field.annotation):
                if sub not in seen:
                    is_list = typing.get_origin(field.annotation) is list
                    walk(sub, path + ("[]" if is_list else ""), (*seen, sub))

    walk(Experiment, "", (Experiment,))
    return "\n".join(lines) + "\n"


def write(readme: Path) -> bool:
    text = readme.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    new = f"{head}{START}\n{reference()}{END}{tail}"
    changed = new != text
    readme.write_text(new)
    return changed


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        write(Path(sys.argv[2]))
    else:
        print(reference())
