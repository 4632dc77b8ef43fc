"""Request errors and field checks shared by the OpenAI and Anthropic front ends.

An ApiError carries an HTTP status and a kind; each API renders it in its own error shape.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A request the server refuses: `status`, a message naming the field, and its kind."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind  # invalid_request, authentication, not_found, overloaded, too_large, ...
        self.param = param
        self.code = code


# kind -> the `type` each API's clients expect in the error body.
_OPENAI_TYPES = {"authentication": "invalid_request_error", "not_found": "invalid_request_error",
                 "overloaded": "server_error", "internal": "server_error",
                 "too_large": "invalid_request_error"}
_ANTHROPIC_TYPES = {"invalid_request": "invalid_request_error",
                    "authentication": "authentication_error", "not_found": "not_found_error",
                    "overloaded": "overloaded_error", "internal": "api_error",
                    "too_large": "request_too_large"}


def openai_error(err: ApiError) -> dict:
    return {"error": {"message": err.message,
                      "type": _OPENAI_TYPES.get(err.kind, "invalid_request_error"),
                      "param": err.param, "code": err.code}}


def anthropic_error(err: ApiError) -> dict:
    return {"type": "error",
            "error": {"type": _ANTHROPIC_TYPES.get(err.kind, "invalid_request_error"),
                      "message": err.message}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
               list: "an array", dict: "an object"}


def field(body: dict, name: str, kinds: type | tuple[type, ...], default: Any = None,
          required: bool = False, where: str = "") -> Any:
    """`body[name]` checked against `kinds` (JSON types; bool is never an int, int is a number)."""
    param = f"{where}{name}"
    if name not in body or body[name] is None:
        if required:
            raise bad(param, "required")
        return default
    value = body[name]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not _is(value, kinds):
        wanted = " or ".join(_TYPE_NAMES[k] for k in kinds)
        raise bad(param, f"expected {wanted}, got {_json_type(value)}")
    return float(value) if kinds == (float,) else value


def _is(value: Any, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and float in kinds:
        return True
    return isinstance(value, kinds)


def _json_type(value: Any) -> str:
    for kind, name in (("bool", "a boolean"), ("str", "a string"), ("int", "an integer"),
                       ("float", "a number"), ("list", "an array"), ("dict", "an object")):
        if type(value).__name__ == kind:
            return name
    return type(value).__name__


def string_list(body: dict, name: str, limit: int | None = None) -> list[str]:
    """A string or a list of strings (`stop`), as a list."""
    value = field(body, name, (str, list), default=[])
    values = [value] if isinstance(value, str) else value
    if not all(isinstance(v, str) for v in values):
        raise bad(name, "expected a string or an array of strings")
    if limit is not None and len(values) > limit:
        raise bad(name, f"at most {limit} sequences")
    return [v for v in values if v]
