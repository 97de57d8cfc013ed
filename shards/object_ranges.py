"""Range requests to an object store: which byte ranges to ask for, and when to ask again.

`coalesce` turns the members a reader will read soon (each its tar header and data, as one
interval of its shard) into few range requests: intervals of one object closer than `max_gap`
bytes are merged into one request of at most `max_bytes` (a single longer member gets its own).
`is_retryable` says whether a failed request is worth repeating (throttling such as S3's
`503 SlowDown`, any 5xx, 429, timeouts and dropped connections), `backoff_s` how long to wait
before the next try (exponential with full jitter), and `is_changed_object` recognises the
answer of a conditional GET whose object was replaced (`412 Precondition Failed`).
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass

# error codes and class names of the S3 / HTTP client stack that mean "try again"
_THROTTLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "503",
        "500",
        "502",
        "504",
        "429",
    }
)
_TRANSIENT_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "HTTPClientError",
        "ResponseParserError",
        "IncompleteRead",
        "IncompleteReadError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ClientConnectionError",
        "ClientConnectorError",
        "ClientOSError",
        "FSTimeoutError",
    }
)
_TRANSIENT_ERRNO = frozenset(
    {errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.EAGAIN, errno.EPIPE}
    | ({errno.EREMOTEIO} if hasattr(errno, "EREMOTEIO") else set())
)
_TRANSIENT_WORDS = ("slowdown", "slow down", "reduce your request rate", "service unavailable")


@dataclass(frozen=True)
class Interval:
    """Bytes [start, end) of one object that one member needs (`item`: the caller's index)."""

    start: int
    end: int
    item: int


@dataclass(frozen=True)
class RangeRequest:
    """One range request: bytes [start, end) of an object, covering the intervals `items`."""

    start: int
    end: int
    items: tuple[int, ...]

    @property
    def size(self) -> int:
        return self.end - self.start


def coalesce(intervals: list[Interval], max_gap: int, max_bytes: int) -> list[RangeRequest]:
    """Range requests covering every interval of one object, in offset order: an interval joins
    the current request when it starts at most `max_gap` bytes after the request's end and the
    request stays within `max_bytes` (an interval longer than `max_bytes` is a request alone).
    Intervals may overlap or repeat; empty ones are covered by the request around them."""
    out: list[RangeRequest] = []
    start = end = -1
    items: list[int] = []
    for iv in sorted(intervals, key=lambda i: (i.start, i.end, i.item)):
        if items and iv.start - end <= max_gap and max(end, iv.end) - start <= max_bytes:
            end = max(end, iv.end)
            items.append(iv.item)
            continue
        if items:
            out.append(RangeRequest(start, end, tuple(items)))
        start, end, items = iv.start, iv.end, [iv.item]
    if items:
        out.append(RangeRequest(start, end, tuple(items)))
    return out


def _chain(exc: BaseException, depth: int = 6) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(seen) < depth and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _response_status(exc: BaseException) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError-like exception, else ("", 0)."""
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        err = resp.get("Error") or {}
        meta = resp.get("ResponseMetadata") or {}
        status = meta.get("HTTPStatusCode") or 0
        return str(err.get("Code", "")), int(status) if isinstance(status, int) else 0
    status = getattr(exc, "status", None)  # aiohttp's ClientResponseError (http/https)
    return "", status if isinstance(status, int) else 0


def is_changed_object(exc: BaseException) -> bool:
    """True when a conditional request failed because the object is no longer the one first
    seen (HTTP 412, `PreconditionFailed`)."""
    for e in _chain(exc):
        code, status = _response_status(e)
        if code == "PreconditionFailed" or status == 412:
            return True
    return False


def is_retryable(exc: BaseException) -> bool:
    """True for a failure that a later try may not meet: throttling (503 SlowDown, 429), other 5xx,
    timeouts and connection drops; False for answers that will not change (404, 403, 412, 416)."""
    for e in _chain(exc):
        code, status = _response_status(e)
        if code in _THROTTLE_CODES or status == 429 or status >= 500:
            return True
        if status or code:
            return False  # a definite answer from the server
        if isinstance(e, TimeoutError | ConnectionError) or type(e).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
            return True
        text = str(e).lower()
        if any(w in text for w in _TRANSIENT_WORDS):
            return True
    return False


def status_of(exc: BaseException) -> str:
    """`HTTP 503 SlowDown`-like words for the server's answer behind `exc`, or "" when none."""
    for e in _chain(exc):
        code, status = _response_status(e)
        if status or code:
            return " ".join(x for x in (f"HTTP {status}" if status else "", code) if x and x != str(status))
    return ""


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before try `attempt + 1` (attempt 0 is the first retry): full jitter over
    an exponentially growing window, min(cap, base * 2**attempt) (the AWS SDKs' scheme)."""
    window = min(cap_s, base_s * (2**attempt))
    return (rng or random).uniform(0.0, window)
