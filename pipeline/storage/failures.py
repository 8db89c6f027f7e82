"""Which storage failures are transient, which are the user's to fix, and their one-line, secret-free messages.

Shared by the :class:`~pipeline.storage.store.Storage` facade (its retry loop and its messages), the run lock, and the
CLI (a failure raised by a library outside the facade, botocore or pyarrow's S3 client, is explained here too).
"""

from __future__ import annotations

import errno
import os
from urllib.parse import quote

from pipeline.errors import exception_chain, one_line

__all__ = ["SECRET_ENV_VARS", "explain_storage_failure", "redact"]

#: Environment variables whose values are secrets and must never reach a message or a log.
SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


# Error codes / errno values that mean "try again later" rather than "you did something wrong".
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "BadGateway",
    "GatewayTimeout",
}


_TRANSIENT_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EAGAIN,
    errno.EBUSY,
    errno.EREMOTEIO,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
}


_TRANSIENT_CLASS_NAMES = {
    # botocore
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "HTTPClientError",
    "ResponseStreamingError",
    "IncompleteReadError",
    # aiohttp / fsspec
    "ClientConnectionError",
    "ClientPayloadError",
    "ServerDisconnectedError",
    "FSTimeoutError",
}


_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidClientTokenId",
}


# pyarrow's native S3 client reports AWS errors as OSError text ("AWS Error ACCESS_DENIED ...").
_PYARROW_CREDENTIAL_CODES = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "NoCredentials")


_CREDENTIAL_CLASS_NAMES = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "CredentialRetrievalError",
    "ProfileNotFound",
    "UnauthorizedSSOTokenError",
    "SSOTokenLoadError",
    "TokenRetrievalError",
}


def redact(text: str) -> str:
    """Return ``text`` with the values of AWS secret/session-token variables replaced by ``***``.

    Used on every message this module builds and by the CLI before printing an error, so a
    secret that a library echoes back (for example inside a signed URL) never reaches a terminal
    or a log file.
    """
    secrets: set[str] = set()
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            secrets.add(value)
            secrets.add(quote(value, safe=""))
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def explain_storage_failure(exc: BaseException) -> str | None:
    """A one-line message for a storage failure that escaped :class:`Storage` (Ray Data, pyarrow),
    or None when ``exc`` is not one: rejected/missing credentials, an unreachable endpoint."""
    texts = " ".join(str(e) for e in exception_chain(exc, limit=8))
    if _is_credentials_error(exc) or any(code in texts for code in _PYARROW_CREDENTIAL_CODES):
        return redact(
            one_line(
                f"storage access denied - credentials missing, rejected or without permission "
                f"({_describe(exc)}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), "
                "or AWS_PROFILE, or run with an instance role"
            )
        )
    if (
        any(_class_names(e) & _TRANSIENT_CLASS_NAMES for e in exception_chain(exc, limit=8))
        or "NETWORK_CONNECTION" in texts
    ):
        return redact(one_line(f"storage endpoint unreachable: {_describe(exc)}"))
    return None


def _class_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _error_code(exc: BaseException) -> tuple[str | None, int | None]:
    """(error code, HTTP status) of a botocore ClientError-like exception."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, None
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return (str(code) if code is not None else None), (int(status) if isinstance(status, int) else None)


def _is_transient(exc: BaseException) -> bool:
    """Connection problems, timeouts, 5xx and throttling: worth retrying."""
    for e in exception_chain(exc, limit=8):
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if _class_names(e) & _TRANSIENT_CLASS_NAMES:
            return True
        code, status = _error_code(e)
        if code in _TRANSIENT_CODES or (status is not None and status >= 500):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def _is_credentials_error(exc: BaseException) -> bool:
    """Missing, malformed or rejected credentials (not retried: retrying cannot help)."""
    for e in exception_chain(exc, limit=8):
        if _class_names(e) & _CREDENTIAL_CLASS_NAMES:
            return True
        code, status = _error_code(e)
        if code in _CREDENTIAL_CODES or status == 403:
            return True
    return False


def _is_missing_bucket(exc: BaseException) -> bool:
    for e in exception_chain(exc, limit=8):
        code, _ = _error_code(e)
        if code == "NoSuchBucket":
            return True
        if isinstance(e, FileNotFoundError) and "bucket does not exist" in str(e).lower():
            return True
    return False


def _describe(exc: BaseException) -> str:
    """``Type: message`` of the most informative exception in the chain."""
    for e in exception_chain(exc, limit=8):
        code, _ = _error_code(e)
        if code is not None or _class_names(e) & (_TRANSIENT_CLASS_NAMES | _CREDENTIAL_CLASS_NAMES):
            return f"{type(e).__name__}: {e}"
    return f"{type(exc).__name__}: {exc}"
