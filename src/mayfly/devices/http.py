"""The HTTP device driver: JSON over HTTP, retried with backoff, keep-alive pooled.

The protocol, relative to a device's ``address`` (its base URL)::

    GET  {address}/state           -> 200, a JSON object
    POST {address}/actions/{name}  -> 200/201/202, a JSON object
         body: the payload object; header Idempotency-Key: <key>

A busy or rebooting device answers 503, a rate-limited one 429; either may send
``Retry-After`` (delta-seconds or an HTTP-date).

The driver decides what to send, whether and when to retry, and what an answer
means; one exchange (a request out, its response back) goes through a
:class:`Transport`, by default urllib3's keep-alive pool manager. The embedded
:class:`~mayfly.devices.sim.SimulatorDriver` is this driver with a transport
that calls the simulator in-process.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http.cookiejar import DefaultCookiePolicy
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import requests
import urllib3
from requests.adapters import HTTPAdapter

from mayfly.devices.inventory import Device
from mayfly.errors import DeviceActionError, DeviceUnavailableError

if TYPE_CHECKING:
    from mayfly.devices.httploop import HttpCallLoop

__all__ = ["Answer", "HttpDriver", "RequestsTransport", "Retry", "Transport"]

_log = logging.getLogger(__name__)

_HEADERS = {"Accept": "application/json", "User-Agent": "mayfly-http-driver"}
#: Largest answer body read from a device (decoded): the coordinator makes
#: every device call of its request, so a device that answers without end
#: must not be able to fill its memory.
MAX_ANSWER_BYTES = 1024 * 1024
# Statuses whose Retry-After we honour; other 5xx back off on our own schedule.
_RETRY_AFTER_STATUSES = frozenset({429, 503})


class Answer(Protocol):
    """A device's response, as the driver reads it: the part of ``requests.Response`` used."""

    @property
    def status_code(self) -> int: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def headers(self) -> Mapping[str, str]:
        """Looked up case-insensitively (``Retry-After``)."""
        ...

    @property
    def content(self) -> bytes: ...


class Transport(Protocol):
    """Performs one exchange with a device for :class:`HttpDriver`; must be thread-safe.

    The driver calls :meth:`send` once per attempt and owns everything around
    it: retries, backoff, ``Retry-After``, deadlines and the errors raised.
    """

    def send(
        self,
        device: Device,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str],
        timeout: tuple[float, float],
    ) -> Answer:
        """Send ``method`` ``path`` (relative to the device) and return its answer.

        ``timeout`` is (connect, read) seconds, as ``requests`` takes it.
        Failures are told with ``requests``' exceptions, which the driver maps:

        Raises:
            requests.ConnectTimeout: retried, as a connect timeout.
            requests.Timeout: retried, as a read timeout.
            requests.ConnectionError: retried, as a connection error (likewise
                ``requests.exceptions.ChunkedEncodingError``).
            requests.RequestException: anything else, e.g. a header value that
                cannot be sent: not retried.
        """
        ...

    def close(self) -> None:
        """Release what the transport holds; safe to call more than once."""
        ...


class RequestsTransport:
    """A transport on ``requests`` over one keep-alive pooled session.

    Not the default (urllib3 directly costs half the CPU per call); it is
    here for callers that want ``requests``' machinery, and for tests that
    script answers with the ``responses`` library, which patches it.

    One ``requests.Session`` is shared by every thread: its urllib3 pool manager
    is thread-safe, and sharing lets any thread reuse any idle keep-alive
    connection. Nothing mutates the session after construction; cookies are
    refused so that one device's cookie never reaches another on the same host.
    """

    def __init__(self, pool_size: int) -> None:
        session = requests.Session()
        # Retries are HttpDriver's (they know Retry-After and deadlines), so urllib3 makes none.
        adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        # No proxy variables or ~/.netrc lookups on every call: devices are reached directly.
        session.trust_env = False
        session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
        session.headers.update({"Accept": "application/json", "User-Agent": "mayfly-http-driver"})
        self._session = session

    def send(
        self,
        device: Device,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str],
        timeout: tuple[float, float],
    ) -> requests.Response:
        return self._session.request(
            method,
            device.address.rstrip("/") + path,
            data=body,
            headers=headers,
            timeout=timeout,
            allow_redirects=False,
        )

    def close(self) -> None:
        self._session.close()


class _Urllib3Transport:
    """The default transport: urllib3's thread-safe pool manager, keep-alive.

    urllib3 directly, not ``requests`` over it: a call costs about half the
    CPU (no session, cookie jar, hooks or proxy lookups per request), and a
    coordinator makes every device call of its request. Its failures are
    told as ``requests``' exceptions, the :class:`Transport` contract.
    Cookies are never kept (urllib3 has no jar), so one device's cookie never
    reaches another on the same host. An answer is read up to
    :data:`MAX_ANSWER_BYTES`; a longer one is refused, not retried.
    """

    def __init__(self, pool_size: int) -> None:
        self._pool = urllib3.PoolManager(
            num_pools=pool_size,
            maxsize=pool_size,
            block=False,
            retries=False,
        )

    def send(
        self,
        device: Device,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str],
        timeout: tuple[float, float],
    ) -> Answer:
        url = device.address.rstrip("/") + path
        try:
            response = self._pool.request(
                method,
                url,
                body=body,
                headers={**_HEADERS, **headers},
                timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
                redirect=False,
                retries=False,
                preload_content=False,
            )
            try:
                content = response.read(MAX_ANSWER_BYTES + 1)
            except BaseException:
                response.close()
                raise
            if len(content) > MAX_ANSWER_BYTES:
                response.close()  # the rest unread: this connection is not reused
            else:
                response.release_conn()
        except urllib3.exceptions.NewConnectionError as exc:
            # Checked first: urllib3 2 makes it a ConnectTimeoutError too.
            raise requests.ConnectionError(exc) from exc
        except urllib3.exceptions.ConnectTimeoutError as exc:
            raise requests.ConnectTimeout(str(exc)) from exc
        except urllib3.exceptions.TimeoutError as exc:
            raise requests.ReadTimeout(str(exc)) from exc
        except (urllib3.exceptions.LocationValueError, ValueError) as exc:
            raise requests.RequestException(f"{url}: {exc}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise requests.ConnectionError(exc) from exc
        if len(content) > MAX_ANSWER_BYTES:
            # Not retried: the device would only send it again.
            raise requests.RequestException(f"answer of more than {MAX_ANSWER_BYTES} bytes")
        return _Urllib3Answer(response, content)

    def close(self) -> None:
        self._pool.clear()


class _Urllib3Answer:
    def __init__(self, response: urllib3.BaseHTTPResponse, content: bytes) -> None:
        self.status_code = response.status
        self.reason = response.reason
        self.headers = response.headers
        self.content = content


class HttpDriver:
    """A thread-safe :class:`~mayfly.devices.driver.DeviceDriver` for HTTP devices.

    Each attempt is one :meth:`Transport.send`; the default transport shares
    one keep-alive urllib3 pool manager between all threads and keeps no
    cookies (see ``_Urllib3Transport``).

    Args:
        connect_timeout: seconds to wait for a TCP (and TLS) connection.
        read_timeout: seconds to wait for each read of the answer (a bound per
            socket read, not on the whole answer).
        retries: retries after the first attempt, so ``retries + 1`` attempts.
        backoff: delay before the first retry; doubles each retry, plus up to
            10% jitter so a fleet that failed together does not retry together.
        max_backoff: cap on the exponential delay (before jitter).
        max_retry_after: cap on a device's ``Retry-After``, so a device cannot
            park a worker for long.
        pool_size: keep-alive connections kept per host, and hosts kept; size it
            to the number of threads using the driver. Checked, but only the
            default transport uses it.
        sleep: called to wait between attempts; tests inject a recorder.
        transport: performs each exchange; None for urllib3's pool manager (the
            default transport, closed by :meth:`close` like any other).
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        max_retry_after: float = 10.0,
        pool_size: int = 64,
        sleep: Callable[[float], None] = time.sleep,
        transport: Transport | None = None,
    ) -> None:
        if retries < 0 or pool_size < 1:
            raise ValueError("retries must be >= 0 and pool_size >= 1")
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._attempts = retries + 1
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._max_retry_after = max_retry_after
        self._sleep = sleep
        self._transport = _Urllib3Transport(pool_size) if transport is None else transport
        self._pool_size = pool_size
        self._loop: HttpCallLoop | None = None

    @property
    def uses_default_transport(self) -> bool:
        """Whether exchanges go over urllib3's pool (no transport was given):
        then :meth:`call_loop` can make them on non-blocking sockets instead."""
        return isinstance(self._transport, _Urllib3Transport)

    def call_loop(self) -> HttpCallLoop | None:
        """This driver's non-blocking engine for a caller that runs its own loop
        (the coordinator), made on first use; None when a transport was given
        (the engine speaks only the default transport's HTTP). One caller loop
        per driver: the engine is not thread-safe."""
        if not self.uses_default_transport:
            return None
        if self._loop is None:
            from mayfly.devices.httploop import HttpCallLoop

            self._loop = HttpCallLoop(self)
        return self._loop

    def state(self, device: Device, *, deadline: float | None = None) -> dict[str, Any]:
        """The device's current state (``GET {address}/state``); ``deadline`` as in :meth:`action`.

        Raises:
            DeviceUnavailableError: unreachable, 5xx or 429 after retries, or
                the deadline passed.
            DeviceActionError: a 4xx, or an answer that is not a JSON object.
        """
        return self._call(device, *self.exchange(device, "state", None, None, None), deadline)

    def action(
        self,
        device: Device,
        name: str,
        payload: dict[str, Any],
        idempotency_key: str,
        *,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """Ask the device to perform ``name``; its JSON answer, as is.

        Args:
            device: the device to act on.
            name: the action (``reboot``...), quoted into the URL path.
            payload: the JSON body.
            idempotency_key: sent as ``Idempotency-Key`` on every attempt.
            deadline: a ``time.monotonic()`` value not to wait past, or None:
                no sleep runs past it, timeouts shrink to fit the time left
                (they bound each socket operation, not the whole exchange).

        Raises:
            DeviceUnavailableError: unreachable, 5xx or 429 after retries, or
                the deadline passed.
            DeviceActionError: the device refused (4xx), answered something
                that is not a JSON object, or the payload is not JSON.
        """
        exchange = self.exchange(device, "action", name, payload, idempotency_key)
        return self._call(device, *exchange, deadline)

    def close(self) -> None:
        """Close the pooled connections (the transport). Safe to call more than once."""
        self._transport.close()
        if self._loop is not None:
            self._loop.close()

    # -- the decisions, shared with the non-blocking engine (httploop) --------

    @property
    def pool_size(self) -> int:
        """Keep-alive connections kept per host."""
        return self._pool_size

    @property
    def attempts(self) -> int:
        """Attempts per call: the first and its retries."""
        return self._attempts

    def exchange(
        self,
        device: Device,
        op: str,
        name: str | None,
        payload: dict[str, Any] | None,
        idempotency_key: str | None,
    ) -> tuple[str, str, bytes | None, dict[str, str]]:
        """What ``op`` (``state`` or ``action``) sends: method, path, body, headers.

        Raises:
            DeviceActionError: the payload is not JSON.
        """
        if op == "state":
            return "GET", "/state", None, {}
        path = f"/actions/{quote(name or '', safe='')}"
        try:
            # Encoded once, so every retry sends the very same bytes.
            body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise DeviceActionError(device.id, f"POST {path}: payload is not JSON: {exc}") from exc
        # Retrying a POST is safe only because every attempt carries the same
        # Idempotency-Key: a device that applied an earlier attempt whose answer
        # we lost replays that answer instead of acting twice.
        headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key or ""}
        return "POST", path, body, headers

    def timeouts(self, device: Device, what: str, deadline: float | None) -> tuple[float, float]:
        """(connect, read) seconds for the next attempt, shrunk to the deadline.

        Raises:
            DeviceUnavailableError: the deadline has passed.
        """
        connect, read = self._connect_timeout, self._read_timeout
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeviceUnavailableError(device.id, f"deadline passed before {what}")
            connect, read = min(connect, remaining), min(read, remaining)
        return connect, read

    def judge(self, device: Device, what: str, response: Answer) -> dict[str, Any] | Retry:
        """An answer's meaning: the JSON object of a success, or a retry.

        Raises:
            DeviceActionError: a refusal (4xx but 429) or a malformed success.
        """
        status = response.status_code
        if 200 <= status < 300:
            return _json_object(device, what, response)
        if status != 429 and status < 500:
            raise DeviceActionError(device.id, _refusal(what, response))
        # "500 (device fault)": the device's own words say more than a number.
        error = _device_error(response)
        retry_after = None
        if status in _RETRY_AFTER_STATUSES:
            retry_after = _parse_retry_after(response.headers.get("Retry-After"))
        return Retry(f"{status} ({error})" if error else str(status), retry_after)

    def wait_before(
        self, device: Device, what: str, failed: Retry, attempt: int, deadline: float | None
    ) -> float:
        """Seconds to wait before the attempt after ``attempt``, which ``failed``.

        Raises:
            DeviceUnavailableError: that was the last attempt, or the wait
                would pass the deadline.
        """
        if attempt >= self._attempts:
            message = f"{what}: {failed.failure} after {self._attempts} attempts"
            raise DeviceUnavailableError(device.id, message)
        if failed.retry_after is not None:
            delay = min(failed.retry_after, self._max_retry_after)
        else:
            delay = min(self._backoff * 2 ** (attempt - 1), self._max_backoff)
            delay += random.uniform(0, delay / 10)  # noqa: S311 - jitter, not crypto
        if deadline is not None and time.monotonic() + delay >= deadline:
            message = f"deadline passed: {what}: {failed.failure} after {attempt} attempt(s)"
            raise DeviceUnavailableError(device.id, message)
        _log.debug(
            "device %s: %s: %s; retry %d of %d in %.2fs",
            device.id, what, failed.failure, attempt, self._attempts - 1, delay,
        )  # fmt: skip
        return delay

    def sleep(self, seconds: float) -> None:
        """Wait between attempts: ``time.sleep`` unless the driver was given its own."""
        self._sleep(seconds)

    @property
    def sleeps_for_real(self) -> bool:
        """False when a ``sleep`` was injected (tests record the waits)."""
        return self._sleep is time.sleep

    def _call(
        self,
        device: Device,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        deadline: float | None,
    ) -> dict[str, Any]:
        what = f"{method} {path}"
        attempt = 1
        while True:
            connect, read = self.timeouts(device, what, deadline)
            verdict: dict[str, Any] | Retry
            try:
                response = self._transport.send(
                    device, method, path, body, headers, (connect, read)
                )
            except requests.ConnectTimeout:
                verdict = Retry("connect timeout")
            except requests.Timeout:
                verdict = Retry("read timeout")
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                verdict = Retry(f"connection error ({_root_cause(exc)})")
            except requests.RequestException as exc:
                # A malformed address or header: retrying cannot help.
                raise DeviceUnavailableError(device.id, f"{what}: {exc}") from exc
            else:
                verdict = self.judge(device, what, response)
            if not isinstance(verdict, Retry):
                return verdict
            self._sleep(self.wait_before(device, what, verdict, attempt, deadline))
            attempt += 1


@dataclass(frozen=True)
class Retry:
    """A failed attempt that may be retried: what went wrong, and the device's
    ``Retry-After`` in seconds if it gave one."""

    failure: str
    retry_after: float | None = None


def _json_object(device: Device, what: str, response: Answer) -> dict[str, Any]:
    # json.loads on bytes detects UTF-8/16/32 itself, skipping requests' charset guessing.
    cause: ValueError | None = None
    try:
        value = json.loads(response.content)
    except ValueError as exc:
        problem, cause = str(exc), exc
    else:
        if isinstance(value, dict):
            return value
        problem = f"{type(value).__name__}, not an object"
    message = f"{what}: malformed JSON answer ({response.status_code}): {problem}"
    raise DeviceActionError(device.id, message) from cause


def _device_error(response: Answer) -> str | None:
    """The ``error`` field of a JSON answer, truncated: it ends up in events."""
    try:
        error = json.loads(response.content).get("error")
    except (ValueError, AttributeError):
        return None
    return str(error)[:200] if error else None


def _refusal(what: str, response: Answer) -> str:
    message = f"{what}: {response.status_code} {response.reason or ''}".rstrip()
    error = _device_error(response)
    return f"{message}: {error}" if error else message


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait per a ``Retry-After`` value; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000" dates parse naive; HTTP-dates are GMT.
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _root_cause(exc: BaseException) -> str:
    # requests wraps urllib3's MaxRetryError wrapping NewConnectionError wrapping
    # the OSError; the innermost ("[Errno 111] Connection refused") is the news.
    for _ in range(8):
        links = (getattr(exc, "reason", None), exc.__cause__, *exc.args[:1])
        inner = next((e for e in links if isinstance(e, BaseException)), None)
        if inner is None:
            break
        exc = inner
    return str(exc) or type(exc).__name__
