"""FID: the Inception port against a per-op numpy forward pass, the Fréchet distance
against hand-computed cases, streamed statistics, weight files, and `mmt.evaluate fid`."""

import json
import math

import numpy as np
import pytest
import scipy.linalg

from mmt.evaluation import fid, fid_inception

import torch_files

SIZE = 75  # the smallest input Inception-v3 runs at: the same graph, 1x1 at Mixed_7c


def _random_state_dict(seed=0):
    """pytorch-fid's keys and shapes, random values; He-scaled so 94 layers stay O(1)."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in fid_inception.state_dict_shapes().items():
        if key.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = rng.standard_normal(shape, dtype=np.float32) * np.float32(math.sqrt(2.0 / fan_in))
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif key.endswith("bn.weight"):
            state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            state[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return state


# -- an independent numpy forward pass (NCHW, OIHW, torch's conventions) -------------


def _pad(x, ph, pw, value=0.0):
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def _windows(x, kh, kw, stride):
    """x [N, C, H, W] -> [N, C, Ho, Wo, kh, kw]."""
    n, c, h, w = x.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.empty((n, c, ho, wo, kh, kw), x.dtype)
    for i in range(kh):
        for j in range(kw):
            out[..., i, j] = x[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
    return out


def _basic_conv(state, prefix, x, stride=1, padding=(0, 0)):
    """torchvision BasicConv2d in eval mode: conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU."""
    w = state[prefix + ".conv.weight"].astype(np.float64)
    o, _, kh, kw = w.shape
    cols = _windows(_pad(x, *padding), kh, kw, stride)
    y = np.einsum("nchwij,ocij->nohw", cols, w)
    g, b, m, v = (state[f"{prefix}.bn.{k}"].astype(np.float64)[None, :, None, None]
                  for k in ("weight", "bias", "running_mean", "running_var"))
    return np.maximum((y - m) / np.sqrt(v + 1e-3) * g + b, 0.0)


def _max_pool(x, k, stride, pad=0):
    return _windows(_pad(x, pad, pad, -np.inf), k, k, stride).max(axis=(-1, -2))


def _avg_pool_exclude_pad(x, k=3, pad=1):
    """F.avg_pool2d(..., count_include_pad=False): pytorch-fid's FIDInceptionA/C/E_1 patch."""
    sums = _windows(_pad(x, pad, pad), k, k, 1).sum(axis=(-1, -2))
    counts = _windows(_pad(np.ones_like(x[:1, :1]), pad, pad), k, k, 1).sum(axis=(-1, -2))
    return sums / counts


def _reference_features(state, images_uint8, size):
    """pytorch-fid's InceptionV3(resize_input, normalize_input) -> pool3, in numpy."""
    x = images_uint8.astype(np.float64).transpose(0, 3, 1, 2) / 255.0  # ToTensor: NCHW [0, 1]
    x = _torch_bilinear(x, size)
    x = 2 * x - 1
    s = state
    x = _basic_conv(s, "Conv2d_1a_3x3", x, stride=2)
    x = _basic_conv(s, "Conv2d_2a_3x3", x)
    x = _basic_conv(s, "Conv2d_2b_3x3", x, padding=(1, 1))
    x = _max_pool(x, 3, 2)
    x = _basic_conv(s, "Conv2d_3b_1x1", x)
    x = _basic_conv(s, "Conv2d_4a_3x3", x)
    x = _max_pool(x, 3, 2)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):  # FIDInceptionA
        c = lambda n, h, p=(0, 0): _basic_conv(s, f"{name}.{n}", h, padding=p)  # noqa: E731
        x = np.concatenate([
            c("branch1x1", x),
            c("branch5x5_2", c("branch5x5_1", x), (2, 2)),
            c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x), (1, 1)), (1, 1)),
            c("branch_pool", _avg_pool_exclude_pad(x))], axis=1)
    c = lambda n, h, p=(0, 0), st=1: _basic_conv(s, f"Mixed_6a.{n}", h, stride=st, padding=p)  # noqa: E731
    x = np.concatenate([c("branch3x3", x, st=2),
                        c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x), (1, 1)), st=2),
                        _max_pool(x, 3, 2)], axis=1)
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):  # FIDInceptionC
        c = lambda n, h, p=(0, 0): _basic_conv(s, f"{name}.{n}", h, padding=p)  # noqa: E731
        b7 = c("branch7x7_3", c("branch7x7_2", c("branch7x7_1", x), (0, 3)), (3, 0))
        bd = c("branch7x7dbl_1", x)
        for i, p in zip(range(2, 6), ((3, 0), (0, 3), (3, 0), (0, 3))):
            bd = c(f"branch7x7dbl_{i}", bd, p)
        x = np.concatenate([c("branch1x1", x), b7, bd, c("branch_pool", _avg_pool_exclude_pad(x))], axis=1)
    c = lambda n, h, p=(0, 0), st=1: _basic_conv(s, f"Mixed_7a.{n}", h, stride=st, padding=p)  # noqa: E731
    b3 = c("branch3x3_2", c("branch3x3_1", x), st=2)
    b7 = c("branch7x7x3_3", c("branch7x7x3_2", c("branch7x7x3_1", x), (0, 3)), (3, 0))
    x = np.concatenate([b3, c("branch7x7x3_4", b7, st=2), _max_pool(x, 3, 2)], axis=1)
    for name, last in (("Mixed_7b", False), ("Mixed_7c", True)):  # FIDInceptionE_1, E_2
        c = lambda n, h, p=(0, 0): _basic_conv(s, f"{name}.{n}", h, padding=p)  # noqa: E731
        b3 = c("branch3x3_1", x)
        bd = c("branch3x3dbl_2", c("branch3x3dbl_1", x), (1, 1))
        pooled = _max_pool(x, 3, 1, pad=1) if last else _avg_pool_exclude_pad(x)
        x = np.concatenate([c("branch1x1", x),
                            c("branch3x3_2a", b3, (0, 1)), c("branch3x3_2b", b3, (1, 0)),
                            c("branch3x3dbl_3a", bd, (0, 1)), c("branch3x3dbl_3b", bd, (1, 0)),
                            c("branch_pool", pooled)], axis=1)
    return x.mean(axis=(2, 3))  # adaptive average pool to 1x1 -> [N, 2048]


def _torch_bilinear(x, size):
    """F.interpolate(x, (size, size), mode='bilinear', align_corners=False), per output pixel."""
    def axis_weights(n_in):
        out = []
        for o in range(size):
            src = max((o + 0.5) * n_in / size - 0.5, 0.0)
            i0 = min(int(math.floor(src)), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            out.append((i0, i1, src - i0))
        return out

    rows, cols = axis_weights(x.shape[2]), axis_weights(x.shape[3])
    y = np.empty(x.shape[:2] + (size, size))
    for r, (a0, a1, fa) in enumerate(rows):
        row = (1 - fa) * x[:, :, a0, :] + fa * x[:, :, a1, :]  # [N, C, W]
        for c, (b0, b1, fb) in enumerate(cols):
            y[:, :, r, c] = (1 - fb) * row[:, :, b0] + fb * row[:, :, b1]
    return y


# -- tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state():
    return _random_state_dict()


@pytest.fixture(scope="module")
def model(state):
    net = fid_inception.FIDInception()
    net.load_state_dict(state)
    return net


def test_torch_bilinear_known_values():
    # torch: F.interpolate(tensor([[[[0., 1.]]]]), size=(1, 4), mode="bilinear") -> 0, .25, .75, 1
    np.testing.assert_allclose(fid_inception.resize_matrix(2, 4) @ np.array([0.0, 1.0]), [0, 0.25, 0.75, 1])
    # Downsampling by 2 averages pixel pairs (no antialiasing beyond the two taps).
    np.testing.assert_allclose(fid_inception.resize_matrix(4, 2) @ np.array([0.0, 1.0, 2.0, 3.0]), [0.5, 2.5])


def test_features_equal_numpy_reference(model, state):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 40, 52, 3), dtype=np.uint8)  # not square, resized to 75x75
    extractor = fid.FIDExtractor(model, resolution=SIZE, batch_size=2)  # 2 + a padded 1
    got = extractor.features(images)
    want = _reference_features(state, images, SIZE)
    assert got.shape == (3, 2048)
    scale = np.abs(want).max()
    assert scale > 1e-3 and np.abs(want - want[0]).max() > 1e-3 * scale  # non-trivial, image-dependent
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)


def test_frechet_distance_hand_computed():
    # Diagonal: per dimension (s1 + s2 - 2 sqrt(s1 s2)): (1 + 4 - 4) + (4 + 9 - 12) = 2, plus |dmu|^2 = 5.
    mu1, mu2 = np.zeros(2), np.array([1.0, 2.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 9.0])
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(7.0, abs=1e-9)
    # The same rotation of both covariances leaves the distance unchanged.
    c, s = math.cos(0.3), math.sin(0.3)
    rot = np.array([[c, -s], [s, c]])
    assert fid.frechet_distance(mu1, rot @ s1 @ rot.T, mu2, rot @ s2 @ rot.T) == pytest.approx(7.0, abs=1e-9)


def test_frechet_distance_near_singular():
    # S1 is singular up to delta; eig(S1 S2) = l1, l2 with l1 + l2 = 3 + 2 delta, l1 l2 = 2 delta, so
    # tr sqrt(S1 S2) = sqrt(l1) + sqrt(l2) = sqrt(3 + 2 delta + 2 sqrt(2 delta)).
    delta = 1e-10
    s1, s2 = np.array([[1.0, 1.0], [1.0, 1.0 + delta]]), np.diag([1.0, 2.0])
    mu1, mu2 = np.array([0.5, 0.0]), np.zeros(2)
    want = 0.25 + (2 + delta) + 3 - 2 * math.sqrt(3 + 2 * delta + 2 * math.sqrt(2 * delta))
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, abs=1e-6)


def test_frechet_distance_eps_fallback(monkeypatch):
    """A non-finite sqrtm is retried with eps on both diagonals (pytorch-fid's fallback)."""
    real = scipy.linalg.sqrtm
    calls = []

    def flaky(a):
        calls.append(a.copy())
        return np.full_like(a, np.inf) if len(calls) == 1 else real(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky)
    eps = 1e-6
    got = fid.frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.ones(2), np.diag([0.0, 1.0]), eps=eps)
    # (S1 + eps I)(S2 + eps I) = diag((1 + eps) eps, eps (1 + eps)).
    assert len(calls) == 2
    assert got == pytest.approx(2.0 + 2.0 - 2 * 2 * math.sqrt(eps * (1 + eps)), abs=1e-9)


def test_running_statistics_match_numpy_and_fid_of_self_is_zero(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 6)) * [1, 2, 3, 4, 5, 6] + 10.0  # a large mean: cancellation-prone
    stats = fid.FeatureStatistics(6)
    for chunk in np.array_split(x, 7):
        stats.update(chunk)
    np.testing.assert_allclose(stats.mean(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    stats.save(tmp_path / "s.npz")
    mu, sigma, count = fid.load_statistics(tmp_path / "s.npz")
    assert count == 50
    assert abs(fid.frechet_distance(mu, sigma, stats.mean(), stats.covariance())) < 1e-6


def test_extractor_statistics_streams_batches(model):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    extractor = fid.FIDExtractor(model, resolution=SIZE, batch_size=2, jit=False)
    stats = extractor.statistics([images[:2], images[2:4], images[4:]])
    features = extractor.features(images).astype(np.float64)
    assert stats.count == 5
    np.testing.assert_allclose(stats.mean(), features.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.covariance(), np.cov(features, rowvar=False), rtol=1e-4, atol=1e-7)
    other = extractor.statistics([images[::-1]])  # same set, other order and batching
    np.testing.assert_allclose(other.covariance(), stats.covariance(), rtol=1e-5, atol=1e-8)


def test_weights_from_pth_and_npz_and_shape_errors(tmp_path, state):
    pth = tmp_path / "pt_inception.pth"
    with_counters = {**state, "Conv2d_1a_3x3.bn.num_batches_tracked": np.array(7, np.int64)}  # torch >= 0.4.1
    torch_files.save_legacy(pth, torch_files.state_dict_node(with_counters))  # the 2019 release's format
    loaded = fid_inception.read_weights(pth)
    assert set(loaded) == set(with_counters) and loaded["Conv2d_1a_3x3.bn.num_batches_tracked"] == 7
    loaded.pop("Conv2d_1a_3x3.bn.num_batches_tracked")
    np.testing.assert_array_equal(loaded["Mixed_7c.branch_pool.conv.weight"], state["Mixed_7c.branch_pool.conv.weight"])
    assert fid_inception.main([str(pth), str(tmp_path / "w.npz")]) == 0
    assert set(fid_inception.read_weights(tmp_path / "w.npz")) == set(with_counters)
    bad = dict(state)
    bad["Mixed_6b.branch7x7_2.conv.weight"] = np.zeros((128, 128, 7, 1), np.float32)
    with pytest.raises(ValueError, match=r"Mixed_6b\.branch7x7_2\.conv\.weight.*\(128, 128, 7, 1\)"):
        fid_inception.FIDInception().load_state_dict(bad)


def _write_images(folder, images):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")


@pytest.mark.slow
def test_evaluate_fid_cli_folders_and_reference_stats(tmp_path, state, monkeypatch):
    from mmt import evaluate

    np.savez(tmp_path / "inception.npz", **state)
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (6, 24, 24, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
    _write_images(tmp_path / "a", a)
    _write_images(tmp_path / "b", b)
    common = ["--inception_weights", str(tmp_path / "inception.npz"), "--resolution", str(SIZE), "--batch_size", "4"]
    # FID of a set against itself: 0 (through sqrtm of a 2048x2048, rank-5 product: the slow part).
    assert evaluate.main(["fid", "--images", str(tmp_path / "a"), "--reference", str(tmp_path / "a"),
                          "--reference_stats", str(tmp_path / "ref.npz"), "--output", str(tmp_path / "self.json"),
                          *common]) == 0
    assert abs(json.loads((tmp_path / "self.json").read_text())["fid"]) < 1e-3
    mu_ref, sigma_ref, count = fid.load_statistics(tmp_path / "ref.npz")
    assert count == 6
    # Statistics only (no images to score): the same file again.
    assert evaluate.main(["fid", "--reference", str(tmp_path / "a"), "--reference_stats", str(tmp_path / "r2.npz"),
                          *common]) == 0
    np.testing.assert_allclose(fid.load_statistics(tmp_path / "r2.npz")[1], sigma_ref, rtol=1e-6, atol=1e-9)
    # The saved statistics are reused without the reference folder (the distance itself is tested above).
    seen = []
    monkeypatch.setattr(fid, "frechet_distance", lambda mu1, s1, mu2, s2: seen.append((mu1, s1, mu2, s2)) or 12.5)
    assert evaluate.main(["fid", "--images", str(tmp_path / "b"), "--reference_stats", str(tmp_path / "ref.npz"),
                          "--output", str(tmp_path / "b.json"), *common]) == 0
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["fid"] == 12.5 and record["num_images"] == 6 and record["reference_images"] == 6
    (mu1, s1, mu2, s2), = seen
    np.testing.assert_array_equal(mu2, mu_ref)
    np.testing.assert_array_equal(s2, sigma_ref)
    assert np.abs(mu1 - mu_ref).max() > 1e-4  # the other folder's own statistics

    # A T2I workdir: one image per caption, generated in batches with one seed each.
    from mmt import restore

    calls = []

    class T2I:
        def text_to_image(self, prompts, seed=0, **options):
            calls.append((list(prompts), seed, options))
            return np.stack([b[len(p) % 6] for p in prompts]), None

    monkeypatch.setattr(restore, "load_task", lambda workdir: (T2I(), 123))
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "operative_config.gin").write_text("")
    prompts = ["a red circle", "two blue squares", "a green triangle", "one circle", "big square"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    assert evaluate.main(["fid", "--workdir", str(workdir), "--captions", str(tmp_path / "prompts.txt"),
                          "--reference_stats", str(tmp_path / "ref.npz"), "--save_images", str(tmp_path / "gen"),
                          "--num_steps", "3", *common]) == 0
    assert [c[1] for c in calls] == [0, 1] and sum(len(c[0]) for c in calls) == 5
    assert calls[0][2] == {"num_steps": 3}
    record = json.loads((workdir / "eval" / "fid.json").read_text())
    assert record["num_images"] == 5 and record["step"] == 123 and record["fid"] == 12.5
    assert len(list((tmp_path / "gen").glob("*.png"))) == 5


def test_evaluate_fid_user_errors_name_the_path(tmp_path, capsys):
    from mmt import errors, evaluate

    missing = tmp_path / "nope"
    status = errors.run_main(evaluate.main, ["fid", "--images", str(missing), "--reference", str(tmp_path),
                                             "--inception_weights", str(tmp_path / "w.npz")])
    assert status == errors.EXIT_USER_ERROR
    assert str(tmp_path / "w.npz") in capsys.readouterr().err
    status = errors.run_main(evaluate.main, ["fid", "--workdir", str(missing), "--captions", str(missing),
                                             "--reference_stats", str(missing)])
    assert status == errors.EXIT_USER_ERROR
    assert str(missing) in capsys.readouterr().err


@pytest.mark.slow
def test_fid_network_imports_no_tensorflow_and_runs_under_jax(tmp_path, model):
    """Model code is keras.ops only: the same features under KERAS_BACKEND=jax."""
    import importlib.util
    import os
    import subprocess
    import sys

    from harness import assert_no_tensorflow

    assert_no_tensorflow(["mmt/evaluation/fid_inception.py", "mmt/evaluation/fid.py"],
                         ["mmt.evaluation.fid_inception", "mmt.evaluation.fid"])
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    images = np.random.default_rng(5).integers(0, 256, (2, 30, 30, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    model.save_weights(str(tmp_path / "fid.weights.h5"))
    script = f"""
import sys, numpy as np
from mmt.evaluation import fid, fid_inception
m = fid_inception.FIDInception(); m.build(); m.load_weights({str(tmp_path / 'fid.weights.h5')!r})
out = fid.FIDExtractor(m, resolution={SIZE}, batch_size=2).features(np.load({str(tmp_path / 'images.npy')!r}))
np.save({str(tmp_path / 'jax.npy')!r}, out)
assert "tensorflow" not in sys.modules, "tensorflow was imported"
"""
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    want = fid.FIDExtractor(model, resolution=SIZE, batch_size=2, jit=False).features(images)
    np.testing.assert_allclose(np.load(tmp_path / "jax.npy"), want, rtol=0, atol=1e-4 * np.abs(want).max())
