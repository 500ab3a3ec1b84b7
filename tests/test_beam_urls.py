"""The tokenize pipeline on a URL corpus served from 127.0.0.1: errors dead-lettered, SSRF refused."""

import json
import socket
import threading

import pytest

import beam_helpers as h
from beam_pipelines import tokenize

FORBIDDEN = ("169.254.169.254", "10.20.30.40", "127.0.0.2")


@pytest.fixture
def connections(monkeypatch):
    """Every address the process opens a TCP connection to while the pipeline runs."""
    seen = []
    original = socket.create_connection

    def recording(address, *args, **kwargs):
        seen.append(address[0])
        return original(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", recording)
    return seen


def test_url_corpus(tmp_path, connections):
    h.make_tokenizer(tmp_path / "tok")
    h.make_vocab(tmp_path / "spm.model")
    release = threading.Event()
    with h.http_server("127.0.0.1") as server, h.http_server("127.0.0.2") as inner:
        server.routes.update({
            "/a.png": h.Route(body=h.encode(h.smooth_image(1), "PNG")),
            "/b.jpg": h.Route(body=h.encode(h.smooth_image(2), "JPEG"), content_type="image/jpeg"),
            "/c.png": h.Route(body=h.encode(h.smooth_image(3), "PNG")),
            "/hop": h.Route(302, location="/c.png", content_type="text/plain"),
            "/slow.png": h.Route(body=b"late", hold=release),  # answers after the run
            "/page.html": h.Route(body=b"<html>SECRET-BODY</html>", content_type="text/html"),
            "/evil": h.Route(302, location="http://169.254.169.254/latest/meta-data/iam/", content_type="text/plain"),
            "/inner": h.Route(302, location=inner.url("/x.png"), content_type="text/plain"),
        })
        inner.routes["/x.png"] = h.Route(body=h.encode(h.smooth_image(4), "PNG"))
        rows = {
            "a red picture": (server.url("/a.png"), None),
            "a blue picture": (server.url("/b.jpg"), None),
            "a green picture": (server.url("/hop"), None),
            "a missing picture": (server.url("/gone.png"), ("fetch", "http_error")),
            "a slow picture": (server.url("/slow.png"), ("fetch", "timeout")),
            "a web page": (server.url("/page.html"), ("fetch", "bad_content_type")),
            "a metadata redirect": (server.url("/evil"), ("fetch", "url_refused")),
            "a private redirect": (server.url("/inner"), ("fetch", "url_refused")),
            "the metadata server": ("http://169.254.169.254/computeMetadata/v1/", ("fetch", "url_refused")),
            "a private address": ("http://10.20.30.40/x.png", ("fetch", "url_refused")),
            "another loopback": (inner.url("/x.png"), ("fetch", "url_refused")),
            "an ftp picture": ("ftp://127.0.0.1/x.png", ("read", "url_refused")),
        }
        (tmp_path / "urls.tsv").write_text("".join(f"{caption}\t{url}\n" for caption, (url, _) in rows.items()))
        stats = tokenize.run([
            "--source=tsv", f"--input={tmp_path / 'urls.tsv'}", "--columns=caption,url",
            f"--output_dir={tmp_path / 'out'}", f"--image_tokenizer={tmp_path / 'tok'}",
            f"--text_vocab={tmp_path / 'spm.model'}", "--num_shards=2", "--min_image_side=16",
            "--allowed_url_networks=127.0.0.1/32", "--fetch_timeout=3.0", "--fetch_read_timeout=2.0",
            "--fetch_retries=0", *h.beam_args()])
        release.set()
        assert inner.hits == []
    assert not set(connections) & set(FORBIDDEN), connections
    assert stats["inputs"] == len(rows) and stats["written"] == 3
    letters = {}
    for path in (tmp_path / "out" / "dead_letter").glob("*.jsonl"):
        text = path.read_text()
        assert "SECRET-BODY" not in text
        for line in text.splitlines():
            letter = json.loads(line)
            letters[int(letter["key"].split(":")[1])] = (letter["stage"], letter["reason"])
    expected = {i + 1: outcome for i, (_, outcome) in enumerate(rows.values()) if outcome}
    assert letters == expected
