"""Domain errors. Each carries the HTTP status it maps to; main.py renders them as {"detail": ...}."""


class ServiceError(Exception):
    status = 500

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


class PayloadTooLarge(ServiceError):
    status = 413


class TooManyRequests(ServiceError):
    status = 429


class InsufficientStorage(StorageError):
    """The disk is full; nothing stored was changed."""

    status = 507


class TrainingError(Exception):
    """A training problem the user can fix (a base model that cannot load, data that leaves nothing
    to train on); its message says how. The job runner stores it with the failed job."""
