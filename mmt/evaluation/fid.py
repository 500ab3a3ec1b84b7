"""Fréchet Inception Distance: streamed feature statistics and the distance itself.

    stats = FeatureStatistics(2048)
    for batch in batches: stats.update(features(batch))      # float [B, 2048]
    mu, sigma = stats.mean(), stats.covariance()            # float64 [2048], [2048, 2048]
    frechet_distance(mu1, sigma1, mu2, sigma2)              # float

FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al., 2017, eq. 6 of TTUR).
Statistics are running sums (count, sum, sum of outer products) in float64, so 30,000
images (COCO FID-30K) cost two 2048-vectors and one 2048x2048 matrix, not the images.
The covariance is unbiased (divides by n - 1), as `numpy.cov` in pytorch-fid / TTUR.

`FIDExtractor` ties it to the network: uint8 images of any size -> the FID Inception
(`mmt.evaluation.fid_inception`, pytorch-fid's resize protocol) -> statistics, with the
outer products summed on a background thread while the accelerator runs the next batch.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import scipy.linalg

from mmt.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class FeatureStatistics:
    """Running first and second moments of feature vectors, in float64.

    Args:
      dim: feature width (2048 for pool3).
    """

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.count = 0
        self.sum = np.zeros(self.dim, np.float64)
        self.sum_outer = np.zeros((self.dim, self.dim), np.float64)

    def update(self, features) -> None:
        """Adds float [B, dim] feature vectors."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be [B, {self.dim}], got {list(x.shape)}")
        self.count += x.shape[0]
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x

    def mean(self) -> np.ndarray:
        return self.sum / self.count

    def covariance(self) -> np.ndarray:
        """Unbiased covariance (n - 1), float64 [dim, dim]; needs 2 or more vectors."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mu = self.mean()
        return (self.sum_outer - self.count * np.outer(mu, mu)) / (self.count - 1)

    def save(self, path: str | os.PathLike) -> None:
        """`.npz` with `mu`, `sigma` (pytorch-fid's stats format) and `count`."""
        np.savez(path, mu=self.mean(), sigma=self.covariance(), count=np.int64(self.count))


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(mu, sigma, count or None) from a `.npz` written by `FeatureStatistics.save` or pytorch-fid."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"reference statistics {path} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
            count = int(data["count"]) if "count" in data.files else None
    except (KeyError, ValueError, OSError) as e:
        raise UserError(f"{path} is not an FID statistics .npz with 'mu' and 'sigma': {e}") from e
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"{path}: mu {list(mu.shape)} and sigma {list(sigma.shape)} do not match")
    return mu, sigma, count


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    `scipy.linalg.sqrtm(sigma1 @ sigma2)`; when the product is near-singular and the
    square root is not finite, both covariances get `eps` added to their diagonal
    (TTUR's / pytorch-fid's fallback). A negligible imaginary part from rounding is
    dropped; a large one is an error.

    Args:
      mu1, mu2: float [d]; sigma1, sigma2: float [d, d].
    Returns:
      the distance, a Python float (>= 0 up to rounding).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has an imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class FIDExtractor:
    """uint8 images -> FID Inception pool3 features -> `FeatureStatistics`.

    Args:
      model: a built `FIDInception` (weights loaded).
      resolution: network input side (299 under the protocol; tests use less).
      batch_size: images per network call (static shapes: compiled once per image size).
      jit: compile preprocess + network with the backend's XLA.
    """

    def __init__(self, model, resolution: int = 299, batch_size: int = 64, jit: bool = True):
        from keras import ops

        from mmt.evaluation import fid_inception
        from mmt.backend import compile_function

        self.model = model
        self.resolution = int(resolution)
        self.batch_size = int(batch_size)

        def features(images):
            return model(fid_inception.preprocess(images, self.resolution))

        self._features = compile_function(features) if jit else features
        self._to_numpy = ops.convert_to_numpy

    def features(self, images) -> np.ndarray:
        """uint8 [B, H, W, 3] -> float32 [B, 2048].

        The network always sees `batch_size` images (a short batch is padded, the padding
        dropped), so one image size compiles once.
        """
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {list(images.shape)}")
        out = []
        for first in range(0, len(images), self.batch_size):
            chunk = images[first:first + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]), np.uint8)])
            out.append(np.asarray(self._to_numpy(self._features(chunk)), np.float32)[:n])
        return np.concatenate(out) if out else np.zeros((0, 2048), np.float32)

    def statistics(self, batches: Iterable[np.ndarray], progress=None) -> FeatureStatistics:
        """Statistics of every image of `batches` (uint8 [B, H, W, 3] each).

        The float64 outer products of one batch are summed on a worker thread while the
        network runs the next (numpy's BLAS releases the GIL), so the statistics do not
        slow the accelerator down. `progress(n)` is called with each batch's size.
        """
        stats = FeatureStatistics(2048)
        pending: queue.Queue = queue.Queue(maxsize=2)
        errors: list[BaseException] = []

        def accumulate():
            while (item := pending.get()) is not None:
                try:
                    stats.update(item)
                except BaseException as e:  # surfaced on the caller's thread
                    errors.append(e)

        worker = threading.Thread(target=accumulate, daemon=True)
        worker.start()
        try:
            for batch in batches:
                if errors:
                    break
                pending.put(self.features(batch))
                if progress is not None:
                    progress(len(batch))
        finally:
            pending.put(None)
            worker.join()
        if errors:
            raise errors[0]
        return stats


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files (png / jpg / ...) directly in `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def image_batches(files: list[Path], batch_size: int, size: int | None = None) -> Iterator[np.ndarray]:
    """uint8 [B, H, W, 3] batches of the files, RGB.

    Images of one batch must share a size; `size` centre-crops every image to a square
    and resizes it to `size`x`size` (PIL bicubic), as `beam_pipelines.tokenize` does,
    for folders of mixed sizes (COCO). Under pytorch-fid's protocol images go to the
    network at their own size (the bilinear resize to 299 is the network's).
    """
    from PIL import Image

    for start in range(0, len(files), batch_size):
        pixels = []
        for path in files[start:start + batch_size]:
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    if size is not None and im.size != (size, size):
                        side = min(im.size)
                        left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
                        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
                    pixels.append(np.asarray(im, np.uint8))
            except OSError as e:
                raise UserError(f"cannot read image {path}: {e}") from e
        shapes = {p.shape for p in pixels}
        if len(shapes) > 1:
            raise UserError(f"images in {files[start].parent} have different sizes {sorted(shapes)}: pass "
                            f"--image_size to resize them")
        yield np.stack(pixels)


__all__ = ["FIDExtractor", "FeatureStatistics", "frechet_distance", "image_batches", "list_images",
           "load_statistics"]
