"""OpenAI-style errors: `APIError` carries the HTTP status and the body `{"error": {message, type, param, code}}`."""

from __future__ import annotations


class APIError(Exception):
    """An error answered to the client (raised anywhere in a handler)."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable line from pydantic's errors, and the first failing field's name."""
    parts, first = [], None
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if not _is_union_tag(x))
        first = first or loc or None
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}" + (
            f" (got {e['input']!r})" if e.get("type") not in ("missing", "extra_forbidden") and "input" in e
            and not isinstance(e["input"], (dict, list)) else ""))
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more, first


def _is_union_tag(x) -> bool:
    # pydantic names union members in locations ("str", "list[str]", "function-after[...]"); not field names
    return isinstance(x, str) and (x in ("str", "int", "float", "bool") or "[" in x)
