"""beam_pipelines.fetch: timeouts, retries, caps, content types, and the SSRF defence."""

import shutil
import socket
import ssl
import subprocess
import time

import pytest

import beam_helpers as h
from beam_pipelines.fetch import FetchConfig, FetchError, Fetcher, address_refusal

PNG = h.encode(h.smooth_image(0), "PNG")
LOCAL = ("127.0.0.1/32",)  # only the test server's address is admitted


def fetcher(connector=None, resolver=None, **overrides) -> Fetcher:
    settings = dict(connect_timeout=1.0, read_timeout=1.0, total_timeout=1.5, retries=0, backoff=0.01,
                    allowed_networks=LOCAL)
    settings.update(overrides)
    return Fetcher(FetchConfig(**settings), resolver=resolver, connector=connector)


def reason(f: Fetcher, url: str) -> FetchError:
    with pytest.raises(FetchError) as error:
        f.fetch(url)
    return error.value


class Recorder:
    """A connector that records every address it is asked to connect to."""

    def __init__(self):
        self.addresses = []

    def __call__(self, address, timeout):
        self.addresses.append(address[0])
        return socket.create_connection(address, timeout=timeout)


@pytest.fixture
def server():
    with h.http_server("127.0.0.1") as s:
        s.routes.update({
            "/ok.png": h.Route(body=PNG),
            "/octet": h.Route(body=PNG, content_type="application/octet-stream"),
            "/page.html": h.Route(body=b"<html>secret page body</html>", content_type="text/html"),
            "/slow.png": h.Route(body=PNG, delay=6.0),
            "/trickle.png": h.Route(body=PNG[:40], trickle=0.1),
            "/big.png": h.Route(body=b"x" * 5000),
            "/stream.png": h.Route(body=b"x" * 5000, length=-1),
            "/short.png": h.Route(body=b"x" * 10, length=100),
            "/flaky": h.Route(503, b"busy", "text/plain"),
        })
        yield s


def test_good_image(server):
    result = fetcher().fetch(server.url("/ok.png"))
    assert result.data == PNG and result.content_type == "image/png"
    assert fetcher().fetch(server.url("/octet")).data == PNG


def test_404_is_not_retried(server):
    error = reason(fetcher(retries=3), server.url("/nothing-here"))
    assert (error.reason, error.detail) == ("http_error", "HTTP 404")
    assert server.hits == ["/nothing-here"]


def test_5xx_is_retried_with_backoff(server):
    error = reason(fetcher(retries=2, backoff=0.01), server.url("/flaky"))
    assert error.reason == "http_error" and error.detail == "HTTP 503"
    assert server.hits == ["/flaky"] * 3


def test_slow_response_times_out(server):
    start = time.monotonic()
    error = reason(fetcher(read_timeout=0.5, total_timeout=0.8), server.url("/slow.png"))
    assert error.reason == "timeout"
    assert time.monotonic() - start < 4.0  # far below the server's 6 s delay, with room for a loaded CI


def test_trickling_response_hits_the_total_deadline(server):
    start = time.monotonic()
    error = reason(fetcher(read_timeout=1.0, total_timeout=0.8), server.url("/trickle.png"))
    assert error.reason == "timeout"
    assert time.monotonic() - start < 3.0  # the whole body takes 4 s


def test_non_image_body_never_in_the_error(server):
    error = reason(fetcher(), server.url("/page.html"))
    assert error.reason == "bad_content_type"
    assert "secret" not in str(error) and "secret" not in error.detail


def test_size_cap(server):
    assert reason(fetcher(max_bytes=1000), server.url("/big.png")).reason == "too_large"  # Content-Length
    assert reason(fetcher(max_bytes=1000), server.url("/stream.png")).reason == "too_large"  # while reading
    assert len(fetcher(max_bytes=5000).fetch(server.url("/stream.png")).data) == 5000
    assert reason(fetcher(), server.url("/short.png")).reason == "connection_error"


def test_redirects_followed_and_rechecked(server):
    server.routes["/hop"] = h.Route(302, location="/ok.png", content_type="text/plain")
    assert fetcher().fetch(server.url("/hop")).data == PNG
    server.routes["/loop"] = h.Route(302, location="/loop", content_type="text/plain")
    error = reason(fetcher(), server.url("/loop"))
    assert error.reason == "too_many_redirects"
    assert server.hits.count("/loop") == 6  # the first request and 5 redirects


def test_redirect_to_metadata_server_refused_without_request(server):
    recorder = Recorder()
    server.routes["/evil"] = h.Route(302, location="http://169.254.169.254/computeMetadata/v1/",
                                     content_type="text/plain")
    error = reason(fetcher(connector=recorder), server.url("/evil"))
    assert error.reason == "url_refused" and "169.254.169.254" in error.detail
    assert recorder.addresses == ["127.0.0.1"]


def test_redirect_to_another_loopback_address_refused_and_never_reached(server):
    with h.http_server("127.0.0.2") as inner:
        inner.routes["/x.png"] = h.Route(body=PNG)
        server.routes["/evil"] = h.Route(302, location=inner.url("/x.png"), content_type="text/plain")
        error = reason(fetcher(), server.url("/evil"))
        assert error.reason == "url_refused"
        assert inner.hits == []
        # Allowed explicitly, the same redirect goes through.
        assert fetcher(allow_private=True).fetch(server.url("/evil")).data == PNG
        assert inner.hits == ["/x.png"]


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/",
    "http://2852039166/",  # 169.254.169.254 in decimal
    "http://0251.0376.0251.0376/",  # ... and in octal
    "http://10.1.2.3/x.png",
    "http://192.168.0.1/x.png",
    "http://172.16.5.4/x.png",
    "http://100.64.0.1/x.png",  # shared address space (CGNAT)
    "http://224.0.0.1/x.png",
    "http://0.0.0.0/x.png",
    "http://localhost/x.png",
    "http://[::1]/x.png",
    "http://[fe80::1]/x.png",
    "http://[fd00::1]/x.png",
])
def test_private_addresses_refused_before_connecting(url):
    recorder = Recorder()
    error = reason(fetcher(connector=recorder, allowed_networks=()), url)
    assert error.reason == "url_refused", (url, error)
    assert recorder.addresses == []


def test_hostname_resolving_to_private_address_refused():
    recorder = Recorder()
    metadata = fetcher(connector=recorder, resolver=lambda host, port: ["169.254.169.254"])
    assert reason(metadata, "http://metadata.example.com/").reason == "url_refused"
    # One private address among public ones refuses the host (a rebinding set-up).
    mixed = fetcher(connector=recorder, resolver=lambda host, port: ["93.184.216.34", "10.0.0.1"])
    assert reason(mixed, "https://images.example.com/a.jpg").reason == "url_refused"
    assert recorder.addresses == []


def test_connects_to_the_checked_address_not_the_name(server):
    recorder = Recorder()
    port = server.server_address[1]
    pinned = fetcher(connector=recorder, resolver=lambda host, p: ["127.0.0.1"])
    assert pinned.fetch(f"http://images.example.com:{port}/ok.png").data == PNG
    assert recorder.addresses == ["127.0.0.1"]


@pytest.mark.parametrize("url, expected", [
    ("ftp://127.0.0.1/x.png", "url_refused"),
    ("file:///etc/passwd", "url_refused"),
    ("gopher://127.0.0.1:70/", "url_refused"),
    ("http://", "bad_url"),
    ("http://exa mple.com/x.png", "bad_url"),
    ("http://127.0.0.1:99999/x.png", "bad_url"),
])
def test_only_http_and_https(url, expected):
    assert reason(fetcher(), url).reason == expected


def test_address_policy():
    config = FetchConfig()
    assert address_refusal("93.184.216.34", config) is None
    assert address_refusal("2606:2800:220:1:248:1893:25c8:1946", config) is None
    assert "link-local" in address_refusal("169.254.169.254", config)
    assert "loopback" in address_refusal("127.0.0.1", config)
    assert address_refusal("2002:a9fe:a9fe::1", config)  # 6to4 of 169.254.169.254
    assert address_refusal("10.0.0.1", FetchConfig(allow_private=True)) is None
    assert address_refusal("127.0.0.1", FetchConfig(allowed_networks=LOCAL)) is None
    assert address_refusal("127.0.0.2", FetchConfig(allowed_networks=LOCAL))
    with pytest.raises(ValueError):
        FetchConfig(allowed_networks=("not-a-network",))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_verifies_the_certificate_of_the_pinned_host(tmp_path):
    """TLS runs over the checked address and still verifies the host name's certificate."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=images.example.com", "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    with h.http_server("127.0.0.1", routes={"/ok.png": h.Route(body=PNG)}) as server:
        server.socket = context.wrap_socket(server.socket, server_side=True)
        recorder = Recorder()
        pinned = fetcher(connector=recorder, resolver=lambda host, port: ["127.0.0.1"])
        error = reason(pinned, f"https://images.example.com:{server.server_address[1]}/ok.png")
        assert error.reason == "connection_error" and "CERTIFICATE_VERIFY_FAILED" in error.detail
        assert recorder.addresses == ["127.0.0.1"]
