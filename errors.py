"""Domain errors. Each carries the HTTP status it maps to; main.py renders them as {"detail": ...}."""

import json
import re


class ServiceError(Exception):
    status = 500
    headers: dict[str, str] | None = None  # sent with the answer

    def __init__(self, detail: str | dict):
        super().__init__(detail if isinstance(detail, str) else str(detail))
        self.detail = detail


class BadRequest(ServiceError):
    status = 400


class Forbidden(ServiceError):
    status = 403


class NotFound(ServiceError):
    status = 404


class Unprocessable(ServiceError):
    """The request is well-formed but its content cannot be used (an unreadable export file)."""

    status = 422


class Conflict(ServiceError):
    status = 409


class StorageError(ServiceError):
    """Stored data cannot be read or written safely; nothing was changed."""

    status = 500


class Unauthorized(ServiceError):
    status = 401
    headers = {"WWW-Authenticate": "Bearer"}


class PayloadTooLarge(ServiceError):
    status = 413


class TooManyRequests(ServiceError):
    status = 429


class ServiceUnavailable(ServiceError):
    """Busy for now (a full generation queue, the base model still being provisioned): retry after
    `retry_after` seconds, sent as the Retry-After header."""

    status = 503

    def __init__(self, detail: str, retry_after: int):
        super().__init__(detail)
        self.headers = {"Retry-After": str(retry_after)}


class StorageBusy(ServiceUnavailable):
    """A speaker's messages stayed locked by other requests past the wait; nothing was changed.
    The client retries, nothing is wrong with the data."""


class InsufficientStorage(StorageError):
    """The disk is full; nothing stored was changed."""

    status = 507


class TrainingError(Exception):
    """A training problem the user can fix (a base model that cannot load, data that leaves nothing
    to train on); its message says how. The job runner stores it with the failed job."""


_SURROGATES = re.compile("[\ud800-\udfff]")


def scrub(value):
    """`value` with lone surrogates (from JSON such as "\\ud83d") as U+FFFD, so it can be sent as UTF-8."""
    if isinstance(value, str):
        return _SURROGATES.sub("\ufffd", value)
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    return value


def public_errors(errors: list[dict], body=None, content_type: str | None = None, form: str | None = None) -> list[dict]:
    """Validation errors as a 422 shows them: type, location and message. Never the `input` or
    `ctx` pydantic adds: they echo what was sent (people's messages) into answers and logs. A
    string the schema refused because it holds a lone surrogate says so and where.

    Mistakes of the request's form say what to fix instead of what pydantic saw: a body that is not
    JSON (where, and what was expected: `body` is the text FastAPI failed to parse), JSON sent
    without its Content-Type, and, for a route that takes a multipart form (`form`: the curl
    arguments it needs), a body that is not one."""
    if form is not None and not (content_type or "").lower().startswith("multipart/form-data"):
        sent = f"'{content_type}'" if content_type else "a body without Content-Type"
        return [{"type": "multipart_expected", "loc": ["body"],
                 "msg": f"this route takes a multipart form, not {sent}: send the file and fields with curl {form}; "
                        "a dialog as JSON goes to POST /upload-text"}]
    shown = []
    for error in errors:
        msg, value, kind = error.get("msg", ""), error.get("input"), error.get("type")
        found = _SURROGATES.search(value) if isinstance(value, str) else None
        if found:
            msg, kind = (f"contains an invalid character: an unpaired UTF-16 surrogate (U+{ord(found[0]):04X} at index "
                         f"{found.start()}), such as half of an emoji cut in two; send whole characters"), "string_unicode"
        elif kind == "json_invalid" and isinstance(body, str) and len(error.get("loc", ())) == 2:
            msg = _json_problem(body, error["loc"][1], (error.get("ctx") or {}).get("error", "invalid JSON"))
        elif isinstance(value, bytes) and tuple(error.get("loc", ())) == ("body",):  # FastAPI parses JSON only when so labelled
            sent = f"this request's is '{content_type}'" if content_type else "this request had none"
            msg, kind = (f"the body must be sent as JSON, with the header 'Content-Type: application/json' ({sent}); "
                         "with curl: --json '{...}', or -H 'Content-Type: application/json' -d '{...}'"), "json_expected"
        shown.append({"type": kind, "loc": scrub(list(error.get("loc", ()))), "msg": scrub(msg)})
    return shown


def _json_problem(text: str, pos: int, expected: str) -> str:
    """Where a body stops being JSON and what JSON expected there (json's own words, never the body's)."""
    where = json.JSONDecodeError(expected, text, pos)
    hint = ("; JSON takes double quotes around names and strings, and no comma after the last item of an object "
            "or a list") if expected.startswith(("Expecting property name", "Expecting value")) else ""
    return (f"the body is not valid JSON: line {where.lineno}, column {where.colno}: "
            f"{expected[0].lower() + expected[1:]}{hint}")
