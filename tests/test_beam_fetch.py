"""beam_pipelines.fetch: timeouts, retries, caps, content types, and the SSRF defence."""

import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

import beam_helpers as h
from beam_pipelines.fetch import FetchConfig, FetchError, Fetcher, address_refusal

PNG = h.encode(h.smooth_image(0), "PNG")
LOCAL = ("127.0.0.1/32",)  # only the test server's address is admitted


def fetcher(connector=None, resolver=None, clock=time.monotonic, sleep=time.sleep, **overrides) -> Fetcher:
    settings = dict(connect_timeout=1.0, read_timeout=1.0, total_timeout=1.5, retries=0, backoff=0.01,
                    allowed_networks=LOCAL)
    settings.update(overrides)
    return Fetcher(FetchConfig(**settings), resolver=resolver, connector=connector, clock=clock, sleep=sleep)


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
    release = threading.Event()  # "/slow.png" answers only once the test is over
    with h.http_server("127.0.0.1") as s:
        s.routes.update({
            "/ok.png": h.Route(body=PNG),
            "/octet": h.Route(body=PNG, content_type="application/octet-stream"),
            "/page.html": h.Route(body=b"<html>secret page body</html>", content_type="text/html"),
            "/slow.png": h.Route(body=PNG, hold=release),
            "/trickle.png": h.Route(body=b"x" * 2000, trickle=0.05),  # 100 s to send in full
            "/big.png": h.Route(body=b"x" * 5000),
            "/stream.png": h.Route(body=b"x" * 5000, length=-1),
            "/short.png": h.Route(body=b"x" * 10, length=100),
            "/flaky": h.Route(503, b"busy", "text/plain"),
        })
        try:
            yield s
        finally:
            release.set()


def test_good_image(server):
    result = fetcher().fetch(server.url("/ok.png"))
    assert result.data == PNG and result.content_type == "image/png"
    assert fetcher().fetch(server.url("/octet")).data == PNG


def test_404_is_not_retried(server):
    error = reason(fetcher(retries=3), server.url("/nothing-here"))
    assert (error.reason, error.detail) == ("http_error", "HTTP 404")
    assert server.hits == ["/nothing-here"]


def test_5xx_is_retried_with_backoff(server):
    waits = []  # a fake sleep: the backoff is checked, not waited for
    error = reason(fetcher(retries=2, backoff=0.5, sleep=waits.append), server.url("/flaky"))
    assert error.reason == "http_error" and error.detail == "HTTP 503"
    assert server.hits == ["/flaky"] * 3
    # backoff * 2**attempt, times a jitter factor in [0.5, 1.5)
    assert len(waits) == 2 and 0.25 <= waits[0] < 0.75 and 0.5 <= waits[1] < 1.5


def test_slow_response_times_out(server):
    # The server answers only after the test ends, so a returned error is the client giving up.
    error = reason(fetcher(read_timeout=0.5, total_timeout=0.8), server.url("/slow.png"))
    assert error.reason == "timeout" and "read timeout 0.5 s" in error.detail
    assert server.hits == ["/slow.png"]


def test_trickling_response_hits_the_total_deadline(server):
    # One byte every 0.05 s never trips the 1 s read timeout; only the 0.8 s deadline can end it.
    error = reason(fetcher(read_timeout=1.0, total_timeout=0.8), server.url("/trickle.png"))
    assert error.reason == "timeout"
    assert server.client_gone.wait(timeout=30), "the client never closed the connection"
    assert server.gone == ["/trickle.png"]


def test_deadline_covers_every_address_with_a_fake_clock():
    """The per-attempt deadline (1.5 s) bounds each connect and the attempts together."""
    now = [0.0]
    tried = []

    def refusing(address, timeout):  # no traffic: every connect "takes" 1 s and fails
        tried.append((address[0], timeout))
        now[0] += 1.0
        raise ConnectionRefusedError("refused")

    addresses = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]  # TEST-NET-1, never contacted
    f = fetcher(connector=refusing, resolver=lambda host, port: addresses, allowed_networks=("192.0.2.0/24",),
                clock=lambda: now[0])
    error = reason(f, "http://images.example.com/a.jpg")
    assert error.reason == "connection_error"
    assert tried == [("192.0.2.1", 1.0), ("192.0.2.2", 0.5)]  # the third is past the deadline


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
        assert fetcher(allow_private=True, allowed_networks=()).fetch(server.url("/evil")).data == PNG
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
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
    "http://[64:ff9b::10.1.2.3]/x.png",  # NAT64 of a private address
    "http://[::ffff:10.1.2.3]/x.png",
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


def test_nat64_is_judged_by_the_ipv4_address_it_wraps():
    config = FetchConfig()
    assert "169.254.169.254) is a link-local" in address_refusal("64:ff9b::a9fe:a9fe", config)
    assert "private" in address_refusal("64:ff9b::a00:1", config)  # 10.0.0.1
    assert address_refusal("64:ff9b::5db8:d822", config) is None  # 93.184.216.34, public
    assert address_refusal("::ffff:93.184.216.34", config) is None


def test_allowed_networks_admit_only_the_listed_networks():
    """Issue 17 item 10: an allow-list is the whole policy; public addresses outside it are refused."""
    only_local = FetchConfig(allowed_networks=LOCAL)
    assert "not in --allowed_url_networks" in address_refusal("93.184.216.34", only_local)
    assert address_refusal("2606:2800:220:1:248:1893:25c8:1946", only_local)
    assert address_refusal("::ffff:127.0.0.1", only_local) is None  # the same host, spelt in IPv6
    assert address_refusal("64:ff9b::7f00:1", only_local) is None
    # Listing all of 6to4 does not admit the 6to4 form of the metadata server.
    assert address_refusal("2002:a9fe:a9fe::1", FetchConfig(allowed_networks=("2002::/16",)))
    assert address_refusal("2002:5db8:d822::1", FetchConfig(allowed_networks=("2002::/16", "93.184.216.0/24"))) \
        is None
    recorder = Recorder()
    public = fetcher(connector=recorder, resolver=lambda host, port: ["93.184.216.34"])
    error = reason(public, "http://images.example.com/a.jpg")
    assert error.reason == "url_refused" and "93.184.216.34" in error.detail
    assert recorder.addresses == []
    with pytest.raises(ValueError, match="cannot be combined"):
        FetchConfig(allow_private=True, allowed_networks=LOCAL)


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
