"""The Experiment CustomResourceDefinition, generated from the pydantic models of ``alignfake.spec``.

``openapi_schema`` walks the models' fields (not pydantic's JSON Schema, whose ``$ref``s, ``anyOf`` and
``const`` a structural schema forbids) and emits a structural openAPIV3Schema: every node has a ``type``,
nothing is referenced, optional fields are ``nullable``, constraints (``ge``, ``le``, ``min_length`` ...) become
``minimum``, ``maximum``, ``minItems``, and the field docstrings become ``description``. A section that also
accepts a string shorthand (``storage: runs``, ``scenario: helpful-only``, ``documents: file.jsonl``) cannot
have a single type: it is ``x-kubernetes-preserve-unknown-fields`` and validated by the operator with the same
pydantic models. No defaults are emitted, so the API server stores an Experiment as it was written.

``python -m alignfake.k8s.crd operator/crd.yaml`` rewrites the committed CRD; a test checks it is current.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel, ValidationError

from ..spec import API_VERSION, KIND, Experiment
from .render import dump_yaml

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "experiments"
PRESERVE = "x-kubernetes-preserve-unknown-fields"


def openapi_schema(model_cls: type[BaseModel]) -> dict[str, Any]:
    """The structural openAPIV3Schema of a custom resource whose top-level model is ``model_cls`` (with
    ``apiVersion``, ``kind``, ``metadata``, ``spec`` and an optional ``status``)."""
    schema = _model(model_cls)
    props = schema["properties"]
    # Kubernetes owns these: a CRD may not constrain metadata beyond its type.
    props["apiVersion"] = {"type": "string", "description": "alignfake.dev/v1alpha1"}
    props["kind"] = {"type": "string", "description": "Experiment"}
    props["metadata"] = {"type": "object"}
    props["status"] = {"type": "object", PRESERVE: True, "description": "Written by the operator."}
    schema["required"] = [r for r in schema.get("required", []) if r not in ("apiVersion", "kind", "metadata")]
    return schema


def _model(cls: type[BaseModel]) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object"}
    doc = _clean(cls.__doc__)
    if doc and cls.__doc__ != BaseModel.__doc__:
        out["description"] = doc
    props: dict[str, Any] = {}
    required = []
    for name, field in cls.model_fields.items():
        node = _annotation(field.annotation)
        node = _constraints(node, field.metadata)
        if field.description:
            node = {**node, "description": _clean(field.description)}
        props[name] = node
        if field.is_required():
            required.append(name)
    out["properties"] = props
    if required:
        out["required"] = required
    return out


def _annotation(ann: Any) -> dict[str, Any]:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) != 1:
            return {PRESERVE: True}
        node = _annotation(members[0])
        return {**node, "nullable": True} if type(None) in args else node
    if origin is Literal:
        return {"type": _scalar_type(type(args[0])), "enum": list(args)}
    if origin is list:
        return {"type": "array", "items": _annotation(args[0])}
    if origin is dict:
        key, value = args
        if typing.get_origin(key) is Literal:
            return {"type": "object", "properties": {k: _annotation(value) for k in typing.get_args(key)}}
        if value is Any:
            return {"type": "object", PRESERVE: True}
        return {"type": "object", "additionalProperties": _annotation(value)}
    if ann is Any:
        return {PRESERVE: True}
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        if _takes_string_shorthand(ann):
            return {PRESERVE: True}
        return _model(ann)
    return {"type": _scalar_type(ann)}


def _scalar_type(t: type) -> str:
    for py, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string")):
        if t is py:
            return name
    raise TypeError(f"no OpenAPI type for {t!r}")


def _takes_string_shorthand(cls: type[BaseModel]) -> bool:
    """Whether a section may be written as a plain string (a ``mode="before"`` validator turns it into a
    mapping): a model without one rejects a string as 'not a mapping' (``model_type``)."""
    try:
        cls.model_validate("x")
    except ValidationError as e:
        return any(err["type"] != "model_type" for err in e.errors())
    return True


def _constraints(node: dict[str, Any], metadata: list[Any]) -> dict[str, Any]:
    node = dict(node)
    for c in metadata:
        if isinstance(c, annotated_types.Ge):
            node["minimum"] = c.ge
        elif isinstance(c, annotated_types.Gt):
            node["minimum"], node["exclusiveMinimum"] = c.gt, True
        elif isinstance(c, annotated_types.Le):
            node["maximum"] = c.le
        elif isinstance(c, annotated_types.Lt):
            node["maximum"], node["exclusiveMaximum"] = c.lt, True
        elif isinstance(c, annotated_types.MinLen):
            node["minItems" if node.get("type") == "array" else "minLength"] = c.min_length
        elif isinstance(c, annotated_types.MaxLen):
            node["maxItems" if node.get("type") == "array" else "maxLength"] = c.max_length
    return node


def _clean(text: str | None) -> str:
    """A docstring as one paragraph per blank-line-separated block."""
    if not text:
        return ""
    blocks = [" ".join(line.strip() for line in block.splitlines()) for block in text.strip().split("\n\n")]
    return "\n\n".join(b for b in blocks if b)


def crd_manifest() -> dict[str, Any]:
    """The CustomResourceDefinition that lets ``kubectl apply -f`` of an experiment file create an Experiment."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/name": "alignfake",
                                                              "app.kubernetes.io/part-of": "alignfake"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": KIND.lower(),
                      "shortNames": ["afx"], "categories": ["alignfake"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                # `kubectl get experiments` shows what the operator writes to the status (alignfake/operator.py).
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
                ],
                "schema": {"openAPIV3Schema": openapi_schema(Experiment)},
            }],
        },
    }


HEADER = ("# Generated by `python -m alignfake.k8s.crd operator/crd.yaml` from alignfake/spec.py; do not edit.\n")


def crd_yaml() -> str:
    return HEADER + dump_yaml(crd_manifest())


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m alignfake.k8s.crd OUTPUT.yaml")
    Path(args[0]).write_text(crd_yaml(), encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover
    main()
