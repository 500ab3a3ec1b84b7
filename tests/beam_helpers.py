"""Shared pieces of the Beam pipeline tests: tokenizers, images, a poisoned corpus, an HTTP server."""

from __future__ import annotations

import contextlib
import http.server
import io
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

import beam_test_tokenizer
from mmt.tokenizers.text import train_sentencepiece

IMAGE_SIZE = 32
CAPTIONS = [f"a {c} {s} with {n} dots" for c in ("red", "blue", "green", "small", "large")
            for s in ("circle", "square", "picture") for n in ("two", "three", "many")]


def make_tokenizer(directory: Path, image_size: int = IMAGE_SIZE) -> Path:
    beam_test_tokenizer.BeamTestTokenizer(image_size=image_size, downsample=8, vocab_size=64, seed=1).save(directory)
    return directory


def make_vocab(path: Path) -> Path:
    train_sentencepiece(CAPTIONS * 4, path, vocab_size=64)
    return path


def smooth_image(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth random uint8 [H, W, 3] image (JPEG-friendly, distinct per seed)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(x * rng.uniform(2, 9) + y * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)]
    return (np.stack(channels, -1) * 110 + 128).astype(np.uint8)


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def palette_png_with_transparency() -> bytes:
    """32x32 palette PNG: left half opaque red (index 1), right half transparent (index 0)."""
    image = Image.new("P", (40, 32), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    image.paste(1, (0, 0, 20, 32))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0)
    return buffer.getvalue()


def cmyk_jpeg() -> bytes:
    """40x32 CMYK JPEG of pure cyan (C=255): RGB (0, 255, 255)."""
    buffer = io.BytesIO()
    Image.new("CMYK", (40, 32), (255, 0, 0, 0)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def png16_grey(value: int = 0x8080) -> bytes:
    """40x32 16-bit greyscale PNG of one value."""
    image = Image.fromarray(np.full((32, 40), value, np.uint16))
    assert image.mode.startswith("I;16")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def animated_gif() -> bytes:
    """Two frames, 40x32: green first, blue second."""
    frames = [Image.new("RGB", (40, 32), colour) for colour in ((0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def poisoned_corpus(root: Path) -> dict[str, tuple[str, str] | None]:
    """Writes `root/corpus.tsv` and `root/imgs/*`; returns key -> None (written) or (stage, reason)."""
    images = root / "imgs"
    images.mkdir(parents=True)
    files = {f"good_{i}.{'png' if i % 2 else 'jpg'}": encode(smooth_image(i), "PNG" if i % 2 else "JPEG")
             for i in range(6)}
    good_jpeg = files["good_0.jpg"]
    files.update({
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "zero.jpg": b"",
        "text.jpg": b"this is a text file, not a JPEG\n",
        "tiny.png": encode(np.zeros((1, 1, 3), np.uint8), "PNG"),
        "panorama.png": encode(np.full((16, 320, 3), 90, np.uint8), "PNG"),
        "palette.png": palette_png_with_transparency(),
        "cmyk.jpg": cmyk_jpeg(),
        "png16.png": png16_grey(),
        "anim.gif": animated_gif(),
        "x_dup.jpg": good_jpeg,  # the same bytes as good_0.jpg, which sorts first
    })
    for name, data in files.items():
        (images / name).write_bytes(data)
    expected: dict[str, tuple[str, str] | None] = {}
    lines = [b"caption\turl"]

    def row(caption: bytes, ref: bytes | None, outcome):
        lines.append(caption if ref is None else caption + b"\t" + ref)
        expected[f"corpus.tsv:{len(lines)}"] = outcome

    for i in range(6):
        name = f"good_{i}.{'png' if i % 2 else 'jpg'}"
        row(CAPTIONS[i].encode(), f"imgs/{name}".encode(), None)
    row(b"a truncated picture", b"imgs/truncated.jpg", ("decode", "truncated_image"))
    row(b"an empty file", b"imgs/zero.jpg", ("decode", "empty_file"))
    row(b"a text file", b"imgs/text.jpg", ("decode", "not_an_image"))
    row(b"a tiny dot", b"imgs/tiny.png", ("filter_image", "too_small"))
    row(b"a wide panorama", b"imgs/panorama.png", ("filter_image", "bad_aspect_ratio"))
    row(b"a red palette picture", b"imgs/palette.png", None)
    row(b"a cyan cmyk picture", b"imgs/cmyk.jpg", None)
    row(b"a grey deep picture", b"imgs/png16.png", None)
    row(b"a green moving picture", b"imgs/anim.gif", None)
    row(b"a missing picture", b"imgs/missing.png", ("load", "missing_file"))
    row(b"caf\xe9 au lait in latin-1", b"imgs/good_1.png", ("read", "invalid_utf8"))
    row(b"a row without its url column", None, ("read", "missing_column"))
    row(b"the same picture again", b"imgs/x_dup.jpg", ("dedupe", "duplicate_image"))
    row(b"   ", b"imgs/good_2.jpg", ("filter_caption", "empty_caption"))
    row(b"long " * 60, b"imgs/good_3.png", ("filter_caption", "caption_too_long"))
    row(b"a secret file", b"../../etc/passwd", ("read", "path_refused"))
    (root / "corpus.tsv").write_bytes(b"\n".join(lines) + b"\n")
    return expected


# -- a local HTTP server ------------------------------------------------------------


class Route:
    """One canned response.

    `hold`: a `threading.Event` the handler waits for before answering (the test sets it
    when done), so "the client gave up first" is known from events, not from timing.
    `trickle`: seconds between single bytes of the body.
    """

    def __init__(self, status=200, body=b"", content_type="image/png", hold=None, location=None, length=None,
                 trickle=0.0):
        self.status, self.body, self.content_type = status, body, content_type
        self.hold, self.location, self.length, self.trickle = hold, location, length, trickle


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.server.hits.append(self.path)
        route = self.server.routes.get(self.path, Route(404, b"not found", "text/plain"))
        if route.hold is not None:
            route.hold.wait(timeout=60)  # a bound, so a broken test cannot hang the suite
        try:
            self.send_response(route.status)
            if route.location:
                self.send_header("Location", route.location)
            self.send_header("Content-Type", route.content_type)
            if route.length != -1:  # -1: no Content-Length, the body ends when the connection closes
                self.send_header("Content-Length", str(route.length if route.length is not None else len(route.body)))
            self.end_headers()
            if route.trickle:  # one byte at a time: each read is quick, the whole is not
                for i in range(len(route.body)):
                    self.wfile.write(route.body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(route.trickle)
            else:
                self.wfile.write(route.body)
        except OSError:  # the client gave up (timeouts)
            self.server.gone.append(self.path)
            self.server.client_gone.set()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def http_server(host: str = "127.0.0.1", routes: dict | None = None):
    """A threaded server on `host`; yields it with `.routes`, `.hits`, `.url(path)`."""
    server = http.server.ThreadingHTTPServer((host, 0), _Handler)
    server.daemon_threads = True
    server.routes = dict(routes or {})
    server.hits = []
    server.gone = []  # paths whose client disconnected before the whole response was sent
    server.client_gone = threading.Event()
    server.url = lambda path: f"http://{host}:{server.server_address[1]}{path}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def beam_args(mode: str = "in_memory") -> list[str]:
    return [f"--direct_running_mode={mode}", "--direct_num_workers=2"] if mode != "in_memory" else [
        "--direct_running_mode=in_memory"]
