"""The serving-precision warning. The spec refuses to serve a fine-tuned model at a precision other than the
one its adapter was trained on unless ``inference.allow_precision_mismatch`` is set (an adapter trained on an
NF4 base and served on an FP8 base is a known source of error); when it is set, every stage that trains or
serves the model says so."""

from __future__ import annotations

from ..spec import ModelSpec


def precision_mismatch_warning(model: ModelSpec) -> str | None:
    if not model.precision_mismatch:
        return None
    trained, served = model.training_precision, model.inference.precision
    return (f"warning: model {model.name}: the adapter is trained on a {trained} base but served on a {served} "
            "base (inference.allow_precision_mismatch); the served model differs from the trained one")
