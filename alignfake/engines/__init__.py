"""Inference backends behind one interface, registered by name and imported lazily: ``import alignfake``
loads no torch, vllm, openai or anthropic."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from ..errors import EngineError, MissingExtraError
from .base import Engine, Request, Response

__all__ = ["Engine", "Request", "Response", "create_engine", "register_engine", "engine_names"]

_REGISTRY: dict[str, tuple[Callable[..., Engine], tuple[str, ...], str]] = {}


def register_engine(name: str, *, requires: tuple[str, ...] = (), extra: str = "local"):
    """Register a factory ``(**options) -> Engine``. ``requires`` are import names checked before the
    factory runs, so a missing optional package gives an install hint instead of a traceback."""

    def deco(factory: Callable[..., Engine]) -> Callable[..., Engine]:
        _REGISTRY[name] = (factory, requires, extra)
        return factory

    return deco


def engine_names() -> list[str]:
    return sorted(_REGISTRY)


def create_engine(name: str, **options: Any) -> Engine:
    if name not in _REGISTRY:
        raise EngineError(f"unknown engine {name!r}; known: {', '.join(engine_names())}")
    factory, requires, extra = _REGISTRY[name]
    for mod in requires:
        if importlib.util.find_spec(mod) is None:
            raise MissingExtraError(mod, extra)
    return factory(**options)


# Factories import their implementation inside, on first use.


@register_engine("mock", requires=())
def _mock(**options: Any) -> Engine:
    from .mock import MockEngine

    return MockEngine(**options)


@register_engine("transformers", requires=("torch", "transformers"))
def _transformers(**options: Any) -> Engine:
    from .hf import TransformersEngine

    return TransformersEngine(**options)


@register_engine("openai", requires=("openai",), extra="api")
def _openai(**options: Any) -> Engine:
    from .openai_compat import OpenAIEngine

    return OpenAIEngine(**options)


@register_engine("anthropic", requires=("anthropic",), extra="api")
def _anthropic(**options: Any) -> Engine:
    from .anthropic_engine import AnthropicEngine

    return AnthropicEngine(**options)


@register_engine("vllm", requires=("vllm",), extra="vllm")
def _vllm(**options: Any) -> Engine:
    from .vllm import VLLMEngine

    return VLLMEngine(**options)
