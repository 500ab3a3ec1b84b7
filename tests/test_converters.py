"""Importers of public tokenizer weights, on files of the real structure with random
weights written here (no torch, no flax): encode/decode against numpy forward passes,
the safe torch-pickle reader, shape-mismatch messages, and the saved directories."""

import collections
import math
import pickle
import struct

import numpy as np
import pytest

from mmt.tokenizers.converters import common, dalle_dvae, flax_msgpack, maskgit_vqgan, torch_pickle
from mmt.tokenizers.image import ImageTokenizer
from mmt.tokenizers.loading import load_image_tokenizer

import torch_files
from torch_files import Global, Module, Parameter, module_state

# -- numpy helpers (independent of mmt's layers) -----------------------------------------


def _conv_nchw(x, w, b, pad):
    """x [N, C, H, W], w [O, I, k, k] (torch), stride 1, symmetric zero padding."""
    k = w.shape[-1]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, _, h, wd = x.shape
    out = np.zeros((n, w.shape[0], h, wd))
    for i in range(k):
        for j in range(k):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j])
    return out + b[None, :, None, None]


def _conv_nhwc(x, kernel, bias, pad):
    """x [N, H, W, C], kernel [k, k, I, O] (Flax), stride 1, SAME zero padding."""
    k = kernel.shape[0]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    n, h, w, _ = x.shape
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for i in range(k):
        for j in range(k):
            out += xp[:, i:i + h, j:j + w, :] @ kernel[i, j]
    return out + (0.0 if bias is None else bias)


# -- DALL-E dVAE ---------------------------------------------------------------------------

DVAE_FIELDS = dict(n_hid=8, n_blk_per_group=1, vocab_size=16)


def _dall_e_conv(rng, n_in, n_out, kw):
    w = rng.standard_normal((n_out, n_in, kw, kw)).astype(np.float32) / math.sqrt(n_in * kw * kw)
    b = (0.1 * rng.standard_normal(n_out)).astype(np.float32)
    return Module(Global("dall_e.utils", "Conv2d"),
                  module_state(parameters=[("w", Parameter(w)), ("b", Parameter(b))], n_in=n_in, n_out=n_out, kw=kw,
                               use_float16=False, requires_grad=False,
                               device=torch_files.Reduce(Global("torch", "device"), ("cpu",))))


def _dall_e_module(rng, kind):
    """A pickled `dall_e.encoder.Encoder` / `dall_e.decoder.Decoder` of the release's layout."""
    n_hid, blocks, vocab = DVAE_FIELDS["n_hid"], DVAE_FIELDS["n_blk_per_group"], DVAE_FIELDS["vocab_size"]
    n_init = 8
    encoder = kind == "encoder"
    block_cls = Global(f"dall_e.{kind}", "EncoderBlock" if encoder else "DecoderBlock")
    kernels = (3, 3, 3, 1) if encoder else (1, 3, 3, 3)
    seq = lambda items: Module(Global("torch.nn.modules.container", "Sequential"),  # noqa: E731
                               module_state(modules=items))
    relu = lambda: Module(Global("torch.nn.modules.activation", "ReLU"), module_state(inplace=False))  # noqa: E731

    def block(n_in, n_out):
        n_mid = n_out // 4
        widths = [(n_in, n_mid), (n_mid, n_mid), (n_mid, n_mid), (n_mid, n_out)]
        res = []
        for i, ((a, b), k) in enumerate(zip(widths, kernels), 1):
            res += [(f"relu_{i}", relu()), (f"conv_{i}", _dall_e_conv(rng, a, b, k))]
        id_path = (_dall_e_conv(rng, n_in, n_out, 1) if n_in != n_out
                   else Module(Global("torch.nn.modules.linear", "Identity"), module_state()))
        return Module(block_cls, module_state(modules=[("id_path", id_path), ("res_path", seq(res))], n_in=n_in,
                                              n_out=n_out, n_layers=4 * blocks, post_gain=1 / (4 * blocks) ** 2))

    mults = (1, 2, 4, 8) if encoder else (8, 4, 2, 1)
    items = [("input", _dall_e_conv(rng, 3, n_hid, 7) if encoder else _dall_e_conv(rng, vocab, n_init, 1))]
    previous = n_hid if encoder else n_init
    for g, m in enumerate(mults, 1):
        group = []
        for b in range(blocks):
            group.append((f"block_{b + 1}", block(previous, m * n_hid)))
            previous = m * n_hid
        if g < 4:
            group.append(("pool", Module(Global("torch.nn.modules.pooling", "MaxPool2d"),
                                         module_state(kernel_size=2, stride=2, padding=0)))
                         if encoder else ("upsample", Module(Global("torch.nn.modules.upsampling", "Upsample"),
                                                             module_state(scale_factor=2.0, mode="nearest"))))
        items.append((f"group_{g}", seq(group)))
    out_conv = _dall_e_conv(rng, 8 * n_hid, vocab, 1) if encoder else _dall_e_conv(rng, n_hid, 6, 1)
    items.append(("output", seq([("relu", relu()), ("conv", out_conv)])))
    fields = dict(group_count=4, n_hid=n_hid, n_blk_per_group=blocks, vocab_size=vocab, requires_grad=False,
                  use_mixed_precision=True, **({"input_channels": 3} if encoder else
                                               {"output_channels": 3, "n_init": n_init}))
    cls = Global(f"dall_e.{kind}", "Encoder" if encoder else "Decoder")
    return Module(cls, module_state(modules=[("blocks", seq(items))], **fields))


def _dall_e_forward(module: Module, x, kind):
    """The dall_e forward pass of a hand-built module tree, in numpy (NCHW)."""
    def conv(m, h):
        w = m.state["_parameters"]["w"].data.astype(np.float64)
        return _conv_nchw(h, w, m.state["_parameters"]["b"].data.astype(np.float64), (w.shape[-1] - 1) // 2)

    items = module.state["_modules"]["blocks"].state["_modules"]
    h = conv(items["input"], x)
    for g in range(1, 5):
        for name, sub in items[f"group_{g}"].state["_modules"].items():
            if name == "pool":
                n, c, hh, ww = h.shape
                h = h.reshape(n, c, hh // 2, 2, ww // 2, 2).max(axis=(3, 5))
            elif name == "upsample":
                h = h.repeat(2, axis=2).repeat(2, axis=3)
            else:
                mods = sub.state["_modules"]
                r = h
                for i in range(1, 5):
                    r = conv(mods["res_path"].state["_modules"][f"conv_{i}"], np.maximum(r, 0))
                idp = mods["id_path"]
                skip = h if idp.cls.name == "Identity" else conv(idp, h)
                h = skip + sub.state["post_gain"] * r
    return conv(items["output"].state["_modules"]["conv"], np.maximum(h, 0))


@pytest.fixture(scope="module")
def dall_e_files(tmp_path_factory):
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("dall_e")
    enc, dec = _dall_e_module(rng, "encoder"), _dall_e_module(rng, "decoder")
    torch_files.save_zip(folder / "encoder.pkl", enc, archive_name="encoder")  # torch >= 1.6's format
    torch_files.save_legacy(folder / "decoder.pkl", dec)  # and the legacy one: both are read
    return folder, enc, dec


def test_dall_e_dvae_matches_numpy_reference(dall_e_files, tmp_path):
    folder, enc, dec = dall_e_files
    size = 32
    dvae = dalle_dvae.convert(folder / "encoder.pkl", folder / "decoder.pkl", tmp_path / "dvae", image_size=size)
    assert dvae.vocab_size == 16 and dvae.grid_size == (4, 4) and dvae.width == 8
    images = np.random.default_rng(1).integers(0, 256, (2, size, size, 3), dtype=np.uint8)

    x = 0.8 * images.astype(np.float64).transpose(0, 3, 1, 2) / 255.0 + 0.1  # map_pixels, eps 0.1
    logits = _dall_e_forward(enc, x, "encoder")  # [N, K, h, w]
    got = np.asarray(dvae.encoder_logits(images.astype(np.float32) / 127.5 - 1.0))  # [N, h, w, K]
    np.testing.assert_allclose(got, logits.transpose(0, 2, 3, 1), atol=1e-4 * max(1.0, np.abs(logits).max()))
    codes = dvae.encode(images)
    np.testing.assert_array_equal(codes, logits.argmax(axis=1))

    one_hot = np.eye(16)[codes].transpose(0, 3, 1, 2)  # [N, K, h, w]
    stats = _dall_e_forward(dec, one_hot, "decoder")
    mu = stats[:, :3]
    want = np.clip((1 / (1 + np.exp(-mu)) - 0.1) / 0.8, 0, 1).transpose(0, 2, 3, 1)  # unmap_pixels(sigmoid(mu))
    got = (np.asarray(dvae.decode_codes(codes)) + 1.0) / 2.0
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(dvae.decode(codes).astype(int) - np.round(want * 255)).max() <= 1

    # An ordinary tokenizer directory: loads by path like one mmt trained.
    loaded = load_image_tokenizer(tmp_path / "dvae")
    assert type(loaded).__name__ == "DVAE" and loaded.fingerprint() == dvae.fingerprint()
    np.testing.assert_array_equal(loaded.encode(images), codes)
    assert ImageTokenizer.read_config(tmp_path / "dvae")["config"]["epsilon"] == pytest.approx(0.1)


def test_dall_e_shape_mismatch_names_first_tensor(dall_e_files):
    folder, _, _ = dall_e_files
    with pytest.raises(common.ConversionError, match=r"'blocks\.input\.w' has shape \(8, 3, 7, 7\).*needs"):
        dalle_dvae.convert(folder / "encoder.pkl", folder / "decoder.pkl", image_size=32, width=16)
    with pytest.raises(common.ConversionError, match=r"'blocks\.output\.conv\.w' has shape \(16, 64, 1, 1\)"):
        dalle_dvae.convert(folder / "encoder.pkl", folder / "decoder.pkl", image_size=32, vocab_size=32)


def _malicious(marker):
    """A pickle whose REDUCE would run os.system('touch marker') when loaded naively."""
    command = f"touch {marker}".encode()
    return (b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(command)) + command + b"\x85R.")


def test_malicious_pickle_runs_nothing(tmp_path, monkeypatch):
    import os

    marker = tmp_path / "pwned"
    payload = _malicious(marker)
    with monkeypatch.context() as m:  # the payload is live: a plain unpickler calls os.system
        calls = []
        m.setattr(os, "system", lambda command: calls.append(command) or 0)
        pickle.loads(payload)
        assert calls == [f"touch {marker}"]
    torch_files.raw_pickle_zip(tmp_path / "zip.pkl", payload)
    (tmp_path / "legacy.pkl").write_bytes(payload)
    for path in (tmp_path / "zip.pkl", tmp_path / "legacy.pkl"):
        with pytest.raises(torch_pickle.UnsafePickleError, match=r"os\.system"):
            torch_pickle.load(path, dalle_dvae.DALL_E_CLASSES)
        with pytest.raises(common.ConversionError, match=r"os\.system.*not allowed"):
            dalle_dvae.read_module(path, "dall_e.encoder.Encoder")
    assert not marker.exists()
    # A class of the dall_e package outside the allowlist is refused as well.
    torch_files.save_zip(tmp_path / "other.pkl", Module(Global("dall_e.utils", "evil"), module_state()))
    with pytest.raises(torch_pickle.UnsafePickleError, match=r"dall_e\.utils\.evil"):
        torch_pickle.load(tmp_path / "other.pkl", dalle_dvae.DALL_E_CLASSES)


def test_torch_pickle_tensor_views(tmp_path):
    """Non-contiguous views and offsets rebuild like torch (strides in elements)."""
    base = np.arange(24, dtype=np.float32)
    emitter_obj = collections.OrderedDict(a=base.reshape(4, 6))
    torch_files.save_zip(tmp_path / "t.pt", emitter_obj)
    loaded = torch_pickle.load(tmp_path / "t.pt")
    np.testing.assert_array_equal(loaded["a"], base.reshape(4, 6))
    transposed = torch_pickle._tensor_view(base, 2, (3, 2), (1, 6))  # torch: storage[2:].as_strided((3, 2), (1, 6))
    np.testing.assert_array_equal(transposed, [[2, 8], [3, 9], [4, 10]])


# -- MaskGIT VQGAN ---------------------------------------------------------------------------

TINY_MASKGIT = dict(image_size=16, filters=8, channel_multipliers=(1, 2), num_res_blocks=1, embedding_dim=4,
                    codebook_size=16, num_groups=4, entropy_weight=0.0)


def _packb(obj) -> bytes:
    """A minimal msgpack encoder (maps, strings, ints, lists, bytes, Flax ndarray ext 1)."""
    if isinstance(obj, dict):
        out = b"\xde" + struct.pack(">H", len(obj))
        for k, v in obj.items():
            out += _packb(k) + _packb(v)
        return out
    if isinstance(obj, str):
        raw = obj.encode()
        return b"\xd9" + bytes([len(raw)]) + raw
    if isinstance(obj, (list, tuple)):
        return b"\xdc" + struct.pack(">H", len(obj)) + b"".join(_packb(v) for v in obj)
    if isinstance(obj, bytes):
        return b"\xc6" + struct.pack(">I", len(obj)) + obj
    if isinstance(obj, int):
        return b"\xd3" + struct.pack(">q", obj)
    if isinstance(obj, np.ndarray):
        payload = _packb([list(obj.shape), obj.dtype.name, np.ascontiguousarray(obj).tobytes()])
        return b"\xc9" + struct.pack(">I", len(payload)) + b"\x01" + payload
    raise TypeError(type(obj))


def _maskgit_params(rng):
    """Flax parameter tree of MaskGIT's VQVAE at the tiny config (compact-module names)."""
    f, mults, nrb, emb, k = 8, (1, 2), 1, 4, 16
    conv = lambda cin, cout, ks, bias=True: {  # noqa: E731
        "kernel": (rng.standard_normal((ks, ks, cin, cout)) / math.sqrt(cin * ks * ks)).astype(np.float32),
        **({"bias": (0.1 * rng.standard_normal(cout)).astype(np.float32)} if bias else {})}
    gn = lambda c: {"scale": rng.uniform(0.5, 1.5, c).astype(np.float32),  # noqa: E731
                    "bias": (0.1 * rng.standard_normal(c)).astype(np.float32)}

    def resblock(cin, cout):
        block = {"GroupNorm_0": gn(cin), "Conv_0": conv(cin, cout, 3, False), "GroupNorm_1": gn(cout),
                 "Conv_1": conv(cout, cout, 3, False)}
        if cin != cout:
            block["Conv_2"] = conv(cout, cout, 1, False)  # applied to the branch output
        return block

    enc = {"Conv_0": conv(3, f, 3, False)}
    blocks, c = [], f
    for m in mults:
        for _ in range(nrb):
            blocks.append(resblock(c, f * m))
            c = f * m
    blocks += [resblock(c, c) for _ in range(nrb)]
    enc.update({f"ResBlock_{i}": b for i, b in enumerate(blocks)})
    enc.update({"GroupNorm_0": gn(c), "Conv_1": conv(c, emb, 1)})
    dec = {"Conv_0": conv(emb, c, 3)}
    blocks, convs = [resblock(c, c) for _ in range(nrb)], []
    for i in reversed(range(len(mults))):
        for _ in range(nrb):
            blocks.append(resblock(c, f * mults[i]))
            c = f * mults[i]
        if i > 0:
            convs.append(conv(c, c, 3))
    dec.update({f"ResBlock_{i}": b for i, b in enumerate(blocks)})
    dec.update({f"Conv_{i + 1}": cv for i, cv in enumerate(convs)})
    dec.update({"GroupNorm_0": gn(c), f"Conv_{len(convs) + 1}": conv(c, 3, 3)})
    quantizer = {"codebook": rng.standard_normal((k, emb)).astype(np.float32)}
    return {"encoder": enc, "quantizer": quantizer, "decoder": dec}


def _gn(x, p, groups=4, eps=1e-6):
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * p["scale"] + p["bias"]


def _swish(x):
    return x / (1 + np.exp(-x))


def _maskgit_resblock(x, p):
    h = _conv_nhwc(_swish(_gn(x, p["GroupNorm_0"])), p["Conv_0"]["kernel"], None, 1)
    h = _conv_nhwc(_swish(_gn(h, p["GroupNorm_1"])), p["Conv_1"]["kernel"], None, 1)
    residual = _conv_nhwc(h, p["Conv_2"]["kernel"], None, 0) if "Conv_2" in p else x
    return h + residual


def _maskgit_encode(params, images01):
    p = params["encoder"]
    x = _conv_nhwc(images01, p["Conv_0"]["kernel"], None, 1)
    x = _maskgit_resblock(x, p["ResBlock_0"])
    n, h, w, c = x.shape
    x = x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))  # dsample: 2x2 average pool
    x = _maskgit_resblock(x, p["ResBlock_1"])
    x = _maskgit_resblock(x, p["ResBlock_2"])
    return _conv_nhwc(_swish(_gn(x, p["GroupNorm_0"])), p["Conv_1"]["kernel"], p["Conv_1"]["bias"], 0)


def _maskgit_decode(params, codes):
    p = params["decoder"]
    x = params["quantizer"]["codebook"][codes].astype(np.float64)
    x = _conv_nhwc(x, p["Conv_0"]["kernel"], p["Conv_0"]["bias"], 1)
    x = _maskgit_resblock(x, p["ResBlock_0"])
    x = _maskgit_resblock(x, p["ResBlock_1"])
    x = x.repeat(2, axis=1).repeat(2, axis=2)  # nearest upsampling
    x = _conv_nhwc(x, p["Conv_1"]["kernel"], p["Conv_1"]["bias"], 1)
    x = _maskgit_resblock(x, p["ResBlock_2"])
    return _conv_nhwc(_swish(_gn(x, p["GroupNorm_0"])), p["Conv_2"]["kernel"], p["Conv_2"]["bias"], 1)


@pytest.fixture(scope="module")
def maskgit_checkpoint(tmp_path_factory):
    params = _maskgit_params(np.random.default_rng(2))
    folder = tmp_path_factory.mktemp("maskgit") / "tokenizer_imagenet256_checkpoint"
    folder.mkdir()
    (folder / "checkpoint_1000").write_bytes(_packb({"params": params}))
    return folder, params


def test_flax_msgpack_round_trip(maskgit_checkpoint):
    folder, params = maskgit_checkpoint
    tree = flax_msgpack.load(folder)  # the directory: its newest checkpoint_<step>
    np.testing.assert_array_equal(tree["params"]["encoder"]["ResBlock_1"]["Conv_2"]["kernel"],
                                  params["encoder"]["ResBlock_1"]["Conv_2"]["kernel"])
    assert flax_msgpack.unpackb(b"\x93\x01\xff\xa2hi") == [1, -1, "hi"]
    with pytest.raises(flax_msgpack.MsgpackError):
        flax_msgpack.unpackb(b"\xc1")


def test_maskgit_vqgan_matches_numpy_reference(maskgit_checkpoint, tmp_path):
    folder, params = maskgit_checkpoint
    vqgan = maskgit_vqgan.convert(folder / "checkpoint_1000", tmp_path / "vqgan", **TINY_MASKGIT)
    assert vqgan.grid_size == (8, 8) and vqgan.vocab_size == 16
    images = np.random.default_rng(3).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    images01 = images.astype(np.float64) / 255.0  # MaskGIT's input range

    want_z = _maskgit_encode(params, images01)
    got_z = np.asarray(vqgan.encoder(images.astype(np.float32) / 127.5 - 1.0))  # maps to [0, 1] itself
    np.testing.assert_allclose(got_z, want_z, atol=1e-4 * max(1.0, np.abs(want_z).max()))
    book = params["quantizer"]["codebook"].astype(np.float64)
    want_codes = ((want_z[..., None, :] - book) ** 2).sum(-1).argmin(-1)
    codes = vqgan.encode(images)
    np.testing.assert_array_equal(codes, want_codes)

    want_images = _maskgit_decode(params, codes)  # [0, 1] range
    got = (np.asarray(vqgan.decode_codes(codes)) + 1.0) / 2.0
    np.testing.assert_allclose(got, want_images, atol=1e-4 * max(1.0, np.abs(want_images).max()))

    # What training sees (`VQGAN.call`, and VQGANTask's encoder / decoder.conv_out) is the same map.
    reconstruction, train_codes, _ = vqgan(images.astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_array_equal(np.asarray(train_codes), codes)
    np.testing.assert_allclose((np.asarray(reconstruction) + 1.0) / 2.0, want_images,
                               atol=1e-4 * max(1.0, np.abs(want_images).max()))

    loaded = load_image_tokenizer(tmp_path / "vqgan")
    assert loaded.fingerprint() == vqgan.fingerprint()
    config = ImageTokenizer.read_config(tmp_path / "vqgan")["config"]
    assert config["shortcut_from"] == "branch" and config["encoder_input_range"] == "unit"
    np.testing.assert_array_equal(loaded.encode(images), codes)


def test_maskgit_shape_mismatch_names_first_tensor(maskgit_checkpoint):
    folder, _ = maskgit_checkpoint
    with pytest.raises(common.ConversionError, match=r"'encoder/Conv_1/kernel' has shape \(1, 1, 16, 4\)"):
        maskgit_vqgan.convert(folder, **{**TINY_MASKGIT, "embedding_dim": 8})
    with pytest.raises(common.ConversionError, match=r"not found"):
        maskgit_vqgan.convert(folder / "missing")


def test_converter_cli_errors_are_one_line(tmp_path, capsys):
    from mmt.errors import EXIT_USER_ERROR, run_main
    from mmt.tokenizers.converters.__main__ import main

    missing = tmp_path / "encoder.pkl"
    status = run_main(main, ["dalle_dvae", "--encoder", str(missing), "--decoder", str(missing),
                             "--output", str(tmp_path / "out")])
    assert status == EXIT_USER_ERROR
    assert f"error: DALL-E dVAE file {missing} not found" in capsys.readouterr().err


def test_default_vqgan_config_unchanged_by_the_new_options():
    """Tokenizers saved before `shortcut_from` / `encoder_input_range` existed keep their config and fingerprint."""
    from mmt.tokenizers.vqgan import VQGAN

    config = VQGAN(image_size=16, filters=8, channel_multipliers=(1, 2), num_res_blocks=1, embedding_dim=4,
                   codebook_size=16, num_groups=4).tokenizer_config()
    assert "shortcut_from" not in config and "encoder_input_range" not in config
