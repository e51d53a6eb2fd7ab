"""Every failure the service reports, as exceptions that know nothing of HTTP frameworks or gRPC.

Each carries a stable machine-readable ``code``, the HTTP ``status_code`` it means, a ``detail``
sentence safe to show the client, and, for "try again later", ``retry_after_s``. The engine and
the protocol codecs raise them; each protocol turns them into its own wire error in one place
(``/v1``: :func:`service.protocols.v1.error_body`, OIP REST: :func:`service.protocols.oip.
error_body`, both registered by :mod:`service.api.errors`). Bad input is always a 4xx; a 5xx means
a real server fault.
"""

from __future__ import annotations

NOT_READY_DETAIL = "no model is loaded and warmed up yet"


class ServiceError(Exception):
    """Base class: ``code`` and ``status_code`` are class defaults a raise site may override."""

    code: str = "internal_error"
    status_code: int = 500

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        status_code: int | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers the error implies (``Retry-After`` for the retryable ones)."""
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(self.retry_after_s)}


class InvalidRequest(ServiceError):
    code, status_code = "invalid_request", 400


class InvalidParameter(ServiceError):
    code, status_code = "invalid_parameter", 422


class InvalidInput(ServiceError):
    """A tensor that does not fit the model's input."""

    code, status_code = "invalid_input", 400


class InvalidImage(ServiceError):
    code, status_code = "invalid_image", 400


class ImageTooLarge(ServiceError):
    code, status_code = "image_too_large", 413


class PayloadTooLarge(ServiceError):
    code, status_code = "body_too_large", 413


class UnsupportedMediaType(ServiceError):
    code, status_code = "unsupported_media_type", 415


class NotAcceptable(ServiceError):
    code, status_code = "not_acceptable", 406


class NotFound(ServiceError):
    code, status_code = "not_found", 404


class ModelLoadFailed(ServiceError):
    """A model or version could not be loaded (corrupt file, changed contract...); whatever
    served before keeps serving. Triton answers a failed load with 400 too."""

    code, status_code = "load_failed", 400


class Overloaded(ServiceError):
    """Refused to protect the requests already admitted; retry after ``retry_after_s``."""

    code, status_code = "overloaded", 429


class NotReady(ServiceError):
    """The model is not loaded and warm yet, or the server is shutting down."""

    code, status_code = "not_ready", 503

    def __init__(self, detail: str = NOT_READY_DETAIL) -> None:
        # A retry soon succeeds: start-up takes seconds, and a draining server's peers answer.
        super().__init__(detail, retry_after_s=1)


class DeadlineExceeded(ServiceError):
    code, status_code = "timeout", 504


class InferenceFailed(ServiceError):
    """The model run failed: the server's fault, not the client's."""

    code, status_code = "inference_failed", 500
