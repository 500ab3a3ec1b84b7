"""Fetching image URLs from untrusted corpus rows: timeouts, retries, caps, and no SSRF.

A row of a web corpus is untrusted input. A URL pointing at the cloud metadata server
(`http://169.254.169.254/...`), at a service on the worker's network (`10.0.0.7`,
`localhost`), or at a server that redirects there, would make the worker issue that
request with its own network position. So, by default, `Fetcher`:

* accepts only `http` and `https` URLs;
* resolves the host name itself and checks EVERY resolved address: loopback,
  link-local (the metadata server), private, shared (CGNAT), multicast, reserved and
  unspecified addresses are refused, also when written as IPv4-mapped, NAT64
  (`64:ff9b::/96`), 6to4 or Teredo IPv6, or in decimal / octal / hex notation (the
  check is on the resolved address);
* connects to the address it checked -- not to the host name again -- so a DNS answer
  that changes between check and connect (rebinding) cannot slip through; TLS still
  verifies the certificate against the host name (SNI);
* never follows redirects by itself: each `Location` is checked like a new URL, at
  most `max_redirects` hops;
* gives up after `total_timeout` seconds per attempt however slowly the server
  trickles bytes (a watchdog shuts the socket), retries connection errors, timeouts,
  429 and 5xx with exponential backoff and jitter, and never retries other statuses;
* refuses responses whose Content-Type is not an image, and stops reading at
  `max_bytes`.

Errors are `FetchError(reason, detail)`; `detail` holds status codes, sizes and content
types, never the response body. `allow_private` lifts the address checks (local
corpora); `allowed_networks` replaces them: an address is admitted only when it lies in
one of the listed networks (CIDR), public or not -- a test server on `127.0.0.1/32`, or
a corpus that must only reach its own image hosts. The two cannot be combined.
"""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import random
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Callable, Sequence

_REDIRECTS = (301, 302, 303, 307, 308)
_RETRY_STATUSES = (408, 425, 429, 500, 502, 503, 504)
_OCTET_STREAM = ("application/octet-stream", "binary/octet-stream")
_CHUNK = 64 * 1024


@dataclasses.dataclass(frozen=True)
class FetchConfig:
    """How URLs are fetched.

    Attributes:
      connect_timeout: seconds to open the TCP connection (per address).
      read_timeout: seconds any single read may block.
      total_timeout: seconds one attempt (all redirect hops) may take in all.
      retries: further attempts after a retryable failure.
      backoff: first retry waits about this many seconds, doubling each time.
      max_bytes: larger responses are refused (`too_large`).
      max_redirects: most redirect hops followed (each one re-checked).
      allow_private: lift the address checks (trusted, local corpora only).
      allowed_networks: when given, the only CIDR networks admitted (e.g.
        `127.0.0.1/32` for a test server); every other address is refused, public
        or not.
      user_agent: the User-Agent header.
    """

    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    total_timeout: float = 30.0
    retries: int = 2
    backoff: float = 0.5
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5
    allow_private: bool = False
    allowed_networks: tuple[str, ...] = ()
    user_agent: str = "mmt-beam-tokenize/0.1"

    def __post_init__(self):
        for network in self.allowed_networks:
            ipaddress.ip_network(network, strict=False)  # ValueError names a bad CIDR
        if self.allowed_networks and self.allow_private:
            # Which would win is a guess either way; an allow-list is meant to be the whole policy.
            raise ValueError("--allow_private_urls and --allowed_url_networks cannot be combined: "
                             "the networks listed are then the only ones admitted")
        if self.max_bytes < 1 or self.max_redirects < 0 or self.retries < 0:
            raise ValueError("max_bytes must be positive, max_redirects and retries non-negative")


class FetchError(Exception):
    """A URL that gave no image: `reason` is a drop reason, `detail` says more."""

    def __init__(self, reason: str, detail: str, retryable: bool = False):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retryable = retryable


@dataclasses.dataclass(frozen=True)
class FetchResult:
    data: bytes
    content_type: str
    final_url: str


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix


def reached_addresses(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list:
    """The addresses a connection to `ip` reaches, each of which the policy must admit.

    IPv4-mapped (`::ffff:a.b.c.d`) and NAT64 (`64:ff9b::a.b.c.d`, translated by a NAT64
    gateway) addresses are another spelling of their IPv4 address: judged by it alone,
    so `64:ff9b::a9fe:a9fe` counts as the metadata server and a public IPv4 host stays
    reachable from an IPv6-only worker. 6to4 and Teredo addresses are IPv6 hosts behind
    an IPv4 one: both must pass.
    """
    if ip.version == 4:
        return [ip]
    if ip.ipv4_mapped:
        return [ip.ipv4_mapped]
    if ip in _NAT64:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    return [ip] + [a for a in (ip.sixtofour, ip.teredo and ip.teredo[1]) if a]


def address_refusal(address: str, config: FetchConfig) -> str | None:
    """Why `address` (an IP literal) may not be contacted, or None when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 scope id
    candidates = reached_addresses(ip)
    if config.allowed_networks:
        networks = [ipaddress.ip_network(n, strict=False) for n in config.allowed_networks]
        # Everything reached must be listed: `::ffff:127.0.0.1` passes `127.0.0.1/32`, and
        # listing `2002::/16` does not admit the 6to4 form of the metadata server.
        if all(any(c in network for network in networks) for c in candidates):
            return None
        return f"{address} is not in --allowed_url_networks ({', '.join(config.allowed_networks)})"
    if config.allow_private:
        return None
    for candidate in candidates:
        name = address if candidate == ip else f"{address} ({candidate})"
        for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
            if getattr(candidate, f"is_{kind}"):
                return f"{name} is a {kind.replace('_', '-')} address"
        if not candidate.is_global:
            return f"{name} is not a public address"
    return None


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP to a given, already checked IP; `host` stays the name (Host header)."""

    def __init__(self, host: str, port: int, address: str, timeout: float, connector: Callable):
        super().__init__(host, port, timeout=timeout)
        self._address = address
        self._connector = connector

    def connect(self):
        self.sock = self._connector((self._address, self.port), self.timeout)


class _PinnedTLSConnection(http.client.HTTPSConnection):
    """HTTPS to a given, already checked IP; the certificate is verified for `host`."""

    def __init__(self, host: str, port: int, address: str, timeout: float, connector: Callable):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address
        self._connector = connector

    def connect(self):
        sock = self._connector((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _default_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def _default_connector(address: tuple[str, int], timeout: float) -> socket.socket:
    return socket.create_connection(address, timeout=timeout)


class Fetcher:
    """Fetches image URLs under a `FetchConfig` (see the module docstring).

    Args:
      config: timeouts, retries, caps and the address policy.
      resolver: `(host, port) -> [ip, ...]`; tests substitute a fake DNS.
      connector: `((ip, port), timeout) -> socket`; only ever called with a checked IP.
      clock: monotonic seconds (deadlines); sleep: waits between attempts. Tests pass
        fakes, so deadlines and backoff are checked without measuring wall-clock time.
    """

    def __init__(self, config: FetchConfig, resolver: Callable | None = None, connector: Callable | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self._resolve = resolver or _default_resolver
        self._connect = connector or _default_connector
        self._clock = clock
        self._sleep = sleep

    def fetch(self, url: str) -> FetchResult:
        """The image at `url`; raises `FetchError` after the last failed attempt."""
        attempt = 0
        while True:
            try:
                return self._attempt(url)
            except FetchError as error:
                if not error.retryable or attempt >= self.config.retries:
                    raise
            delay = self.config.backoff * (2**attempt) * (0.5 + random.random())
            self._sleep(min(delay, 30.0))
            attempt += 1

    # -- one attempt, all redirect hops -----------------------------------------------

    def _attempt(self, url: str) -> FetchResult:
        deadline = self._clock() + self.config.total_timeout
        for _ in range(self.config.max_redirects + 1):
            status, headers, body_or_location = self._request(url, deadline)
            if status in _REDIRECTS:
                url = urllib.parse.urljoin(url, body_or_location)
                continue
            return FetchResult(body_or_location, headers.get("content-type", ""), url)
        raise FetchError("too_many_redirects", f"more than {self.config.max_redirects} redirects")

    def _check_url(self, url: str) -> tuple[str, str, int, str]:
        """(scheme, host, port, path+query) of an acceptable URL, else FetchError."""
        if any(c.isspace() or ord(c) < 32 for c in url):
            raise FetchError("bad_url", "URL contains whitespace or control characters")
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise FetchError("bad_url", f"URL does not parse: {e}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchError("url_refused", f"scheme {scheme or '(none)'!r} is not http or https")
        host = parts.hostname
        if not host:
            raise FetchError("bad_url", "URL has no host")
        port = port or (443 if scheme == "https" else 80)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        return scheme, host, port, target

    def _addresses(self, host: str, port: int) -> list[str]:
        try:
            addresses = self._resolve(host, port)
        except (socket.gaierror, UnicodeError) as e:
            raise FetchError("dns_error", f"{host} does not resolve ({e})", retryable=True) from None
        if not addresses:
            raise FetchError("dns_error", f"{host} resolves to no address", retryable=True)
        for address in addresses:
            refusal = address_refusal(address, self.config)
            if refusal:  # One bad address refuses the host: it may be a rebinding setup.
                raise FetchError("url_refused", f"host {host}: {refusal}")
        return addresses

    def _request(self, url: str, deadline: float) -> tuple[int, dict, bytes | str]:
        scheme, host, port, target = self._check_url(url)
        addresses = self._addresses(host, port)
        connection_class = _PinnedTLSConnection if scheme == "https" else _PinnedConnection
        last_error: Exception | None = None
        for address in addresses:
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            connection = connection_class(
                host, port, address, min(self.config.connect_timeout, remaining), self._connect
            )
            try:
                connection.connect()
            except OSError as e:  # includes socket.timeout and ssl errors
                connection.close()
                last_error = e
                continue
            return self._exchange(connection, target, deadline)
        if last_error is None or isinstance(last_error, TimeoutError):
            raise FetchError("timeout", f"no connection to {host} in time", retryable=True)
        raise FetchError("connection_error", f"{host}: {type(last_error).__name__}: {last_error}", retryable=True)

    def _exchange(self, connection: http.client.HTTPConnection, target: str, deadline: float):
        """Sends GET, reads the response under the deadline; closes the connection."""
        expired = threading.Event()
        # http.client drops `connection.sock` once the response owns the socket; keep it.
        sock = connection.sock

        def shut():
            expired.set()
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        watchdog = threading.Timer(max(0.0, deadline - self._clock()), shut)
        watchdog.daemon = True
        watchdog.start()
        response = None
        try:
            sock.settimeout(self.config.read_timeout)
            connection.request(
                "GET", target,
                headers={"User-Agent": self.config.user_agent, "Accept": "image/*",
                         "Accept-Encoding": "identity", "Connection": "close"},
            )
            response = connection.getresponse()
            headers = {k.lower(): v for k, v in response.getheaders()}
            status = response.status
            if status in _REDIRECTS:
                location = headers.get("location")
                if not location:
                    raise FetchError("http_error", f"HTTP {status} without a Location header")
                return status, headers, location
            if status != 200:
                raise FetchError("http_error", f"HTTP {status}", retryable=status in _RETRY_STATUSES)
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if not (content_type.startswith("image/") or content_type in _OCTET_STREAM):
                raise FetchError("bad_content_type", f"Content-Type {content_type or '(none)'!r} is not an image")
            length = headers.get("content-length")
            if length and length.isdigit() and int(length) > self.config.max_bytes:
                raise FetchError("too_large", f"Content-Length {length} exceeds {self.config.max_bytes} bytes")
            return status, headers, self._read_body(response, expired)
        except FetchError:
            raise
        except (OSError, http.client.HTTPException) as e:
            if expired.is_set() or isinstance(e, TimeoutError):
                raise FetchError("timeout", f"no complete response within {self.config.total_timeout:g} s "
                                 f"(read timeout {self.config.read_timeout:g} s)", retryable=True) from None
            raise FetchError("connection_error", f"{type(e).__name__}: {e}", retryable=True) from None
        finally:
            watchdog.cancel()
            if response is not None:  # it owns the socket once the server said it closes
                response.close()
            connection.close()

    def _read_body(self, response: http.client.HTTPResponse, expired: threading.Event) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = response.read1(_CHUNK) if hasattr(response, "read1") else response.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > self.config.max_bytes:
                raise FetchError("too_large", f"response exceeds {self.config.max_bytes} bytes")
            chunks.append(chunk)
        if expired.is_set():
            raise OSError("deadline passed")
        if response.length:  # Content-Length promised more than arrived.
            raise FetchError("connection_error", f"connection closed {response.length} bytes short of "
                             "Content-Length", retryable=True)
        return b"".join(chunks)


def parse_networks(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """`"127.0.0.1/32,10.1.0.0/16"` -> checked CIDR strings."""
    if not text:
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(str(ipaddress.ip_network(item.strip(), strict=False)) for item in items if item.strip())
