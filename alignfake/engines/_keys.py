"""API keys for HTTP engines: read from the environment (a Kubernetes secret reaches a pod as an environment
variable through ``secretKeyRef``), never stored in the spec, never logged, never shown in errors or reprs."""

from __future__ import annotations

import os

from ..errors import EngineError


class Secret:
    """A string that does not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def redact(self, text: str) -> str:
        """``text`` with every occurrence of the secret replaced (error bodies sometimes echo headers)."""
        return text.replace(self._value, "[redacted]") if len(self._value) >= 4 else text

    def __repr__(self) -> str:
        return "Secret('[redacted]')"

    __str__ = __repr__


def read_api_key(api_key_env: str | None, default_env: str, *, provider: str, required: bool) -> Secret | None:
    """The key from ``api_key_env`` (which must then be set), else from ``default_env`` if set. Missing and
    ``required`` -> EngineError naming the variable (never a value)."""
    if api_key_env:
        value = os.environ.get(api_key_env)
        if not value:
            raise EngineError(
                f"{provider}: environment variable {api_key_env} (api_key_env) is not set or empty; export the "
                "API key there, or in Kubernetes map a secret to it with secretKeyRef"
            )
        return Secret(value)
    value = os.environ.get(default_env)
    if value:
        return Secret(value)
    if required:
        raise EngineError(
            f"{provider}: no API key: set {default_env}, or name another environment variable with api_key_env"
        )
    return None
