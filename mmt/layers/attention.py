"""Attention masks and multi-head attention (`keras.ops` only).

Masks are boolean with `True` = "this query may attend to this key", shaped `[Tq, Tk]`
(shared by the batch), `[B, Tq, Tk]` or `[B, 1, Tk]` (per-example key padding); every
builder uses static shapes, so the masks compile under XLA/TPU. Combine them with
`combine_masks` (logical and, broadcasting).

DALL-E masks (Ramesh et al., 2021, §2.2 and App. B.1, Fig. 11) cover the sequence
`[text (text_len); image (grid_h * grid_w, raster order)]`. In all three, text attends
to text causally and every image token attends to every text token; they differ in the
image-to-image part. With `qi`, `ki` the raster indices of an image query and key
(`ki <= qi`, the whole mask is causal) and `w` the grid width:

* row (Fig. 11a): `qi - ki <= w`, the previous `w + 1` image tokens in raster order,
  the query included. The extent makes the furthest key the same column of the
  previous row (5 tokens for the figure's 4x4 grid), wrapping across row boundaries.
* column (Fig. 11b): `(qi - ki) % w == 0`, every earlier token of the same column.
  (The paper runs this as row-style attention on the transposed grid, Fig. 11c, purely
  for GPU efficiency; the pattern is the same.)
* convolutional (Fig. 11d, an 11x11 kernel in the paper's last layer): with
  `s = kernel // 2`, the causal part of the `kernel x kernel` neighbourhood. By default
  the neighbourhood is taken in raster offsets, `qi - ki = dr * w + dc` with
  `0 <= dr <= s`, `|dc| <= s`, which wraps across row edges "similar to the row
  attention" as the figure's caption says; `wraparound=False` clips it at the image
  border instead (a plain 2-D causal window).
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
from keras import ops

from mmt.layers.dropout import Dropout

# ----------------------------------------------------------------------------- masks


def full_mask(length: int, key_length: int | None = None):
    """Every query attends to every key (bidirectional encoders: UPGen, M3AE, MAGE).

    Returns bool `[length, key_length or length]`.
    """
    return ops.ones((length, length if key_length is None else key_length), "bool")


def causal_mask(length: int):
    """Query `i` attends to keys `j <= i` (decoder-only language modelling).

    Returns bool `[length, length]`.
    """
    q = ops.arange(length)[:, None]
    k = ops.arange(length)[None, :]
    return k <= q


def prefix_mask(prefix_len, total_len: int):
    """GIT's seq2seq mask (Wang et al., 2022, §3.1; ITIT §3 / App. A text decoder).

    The first `prefix_len` positions (image features) attend to each other
    bidirectionally and never to the text; each text position attends to every prefix
    position and to text positions up to and including itself.

    Args:
      prefix_len: int, or int32 scalar tensor (a per-batch prefix length).
      total_len: int, the full sequence length (prefix + text).

    Returns:
      bool `[total_len, total_len]`.
    """
    q = ops.arange(total_len)[:, None]
    k = ops.arange(total_len)[None, :]
    return ops.logical_or(k <= q, ops.logical_and(k < prefix_len, q < prefix_len))


def padding_mask(valid):
    """Key-padding mask from per-key validity.

    Args:
      valid: bool (or 0/1 int) `[B, Tk]`, True where the key is a real token.

    Returns:
      bool `[B, 1, Tk]`, broadcastable against `[B, Tq, Tk]`.
    """
    return ops.expand_dims(ops.cast(valid, "bool"), 1)


def combine_masks(*masks):
    """Logical and of masks with numpy broadcasting; `None`s are skipped.

    Returns `None` when every mask is `None` (meaning "attend everywhere").
    """
    result = None
    for mask in masks:
        if mask is None:
            continue
        mask = ops.cast(mask, "bool")
        result = mask if result is None else ops.logical_and(result, mask)
    return result


def _grid_hw(grid) -> tuple[int, int]:
    if isinstance(grid, int):
        return grid, grid
    h, w = grid
    return int(h), int(w)


def _dalle_mask(text_len: int, grid, image_rule):
    """Causal mask over `[text; image]` with `image_rule(qi, ki, w)` for image pairs."""
    h, w = _grid_hw(grid)
    total = text_len + h * w
    q = ops.arange(total)[:, None]
    k = ops.arange(total)[None, :]
    causal = k <= q
    # Image queries see every text token (DALL-E §2.2); text queries only see text
    # anyway because of causality.
    key_is_text = k < text_len
    image_ok = image_rule(q - text_len, k - text_len, w)
    return ops.logical_and(causal, ops.logical_or(key_is_text, image_ok))


def dalle_row_mask(text_len: int, grid):
    """DALL-E row attention (Fig. 11a): the previous `w + 1` image tokens, raster order.

    Args:
      text_len: number of text positions before the image.
      grid: int (square) or `(h, w)` image-token grid.

    Returns:
      bool `[text_len + h*w, text_len + h*w]`.
    """
    return _dalle_mask(text_len, grid, lambda qi, ki, w: qi - ki <= w)


def dalle_column_mask(text_len: int, grid):
    """DALL-E column attention (Fig. 11b): every earlier image token of the same column.

    Returns bool `[text_len + h*w, text_len + h*w]`.
    """
    return _dalle_mask(text_len, grid, lambda qi, ki, w: (qi - ki) % w == 0)


def dalle_conv_mask(text_len: int, grid, kernel: int = 11, wraparound: bool = True):
    """DALL-E causal convolutional attention (Fig. 11d; 11x11 in the final layer).

    Args:
      text_len: number of text positions before the image.
      grid: int (square) or `(h, w)` image-token grid.
      kernel: odd kernel size; the window covers the `kernel // 2` previous rows and
        `kernel // 2` columns either side, keeping only raster-earlier positions.
      wraparound: True (the paper's figure) measures the window in raster offsets,
        so it wraps across row edges like row attention; False clips it at the
        image border.

    Returns:
      bool `[text_len + h*w, text_len + h*w]`.
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd int, got {kernel}.")
    s = kernel // 2

    def wrapped(qi, ki, w):
        d = qi - ki
        ok = ops.abs(d) <= s
        for dr in range(1, s + 1):
            ok = ops.logical_or(ok, ops.abs(d - dr * w) <= s)
        return ok

    def clipped(qi, ki, w):
        dr = ops.floor_divide(qi, w) - ops.floor_divide(ki, w)
        dc = ops.mod(qi, w) - ops.mod(ki, w)
        return ops.logical_and(ops.logical_and(dr >= 0, dr <= s), ops.abs(dc) <= s)

    return _dalle_mask(text_len, grid, wrapped if wraparound else clipped)


# ------------------------------------------------------------------------- softmax


def mask_value(dtype) -> float:
    """A large negative *finite* logit for `dtype`.

    Finite (not -inf) so that a fully-masked row gives a uniform distribution rather
    than `exp(-inf - -inf) = NaN`; half the dtype's minimum so that adding a bias or
    subtracting the row max cannot overflow to -inf either.
    """
    dtype = keras.backend.standardize_dtype(dtype)
    return {"float16": -3.0e4, "bfloat16": -1.0e38}.get(dtype, -0.5 * 3.4028235e38)


def _expand_mask(mask):
    """Broadcast a `[Tq, Tk]`, `[B, Tq, Tk]`, `[B, 1, Tk]` or 4-D mask to rank 4."""
    mask = ops.cast(mask, "bool")
    rank = len(mask.shape)
    if rank == 2:
        return mask[None, None]
    if rank == 3:
        return mask[:, None]
    if rank == 4:
        return mask
    raise ValueError(f"attention mask must have rank 2, 3 or 4, got shape {mask.shape}.")


def masked_softmax(logits, mask=None):
    """Softmax over the last axis, in float32 whatever the input dtype.

    Half-precision softmax loses the small probabilities (bf16 has 8 mantissa bits)
    and overflows in fp16, so mixed-precision transformers normalise in float32
    (as t5x, MaskGIT and big_vision do) and cast the probabilities back afterwards.

    Args:
      logits: float `[B, H, Tq, Tk]`.
      mask: optional bool broadcastable to `[B, H, Tq, Tk]` (`[Tq, Tk]`,
        `[B, Tq, Tk]`, `[B, 1, Tk]` or rank 4); True keeps a key.

    Returns:
      float32 `[B, H, Tq, Tk]`. Fully-masked rows come out uniform, never NaN.
    """
    logits = ops.cast(logits, "float32")
    if logits.shape[-1] == 1:  # one key (the empty caption's EOS): its weight is 1, masked or not
        return ops.ones_like(logits)
    if mask is not None:
        logits = ops.where(_expand_mask(mask), logits, mask_value("float32"))
    return ops.softmax(logits, axis=-1)


# ---------------------------------------------------------------------- attention


class _AttentionLayer(keras.layers.Layer):
    """Shared plumbing of layers called as `(x, context=None, mask=None, ...)`.

    * `mask` here is an *attention* mask, not a Keras sequence mask: claiming
      `supports_masking` with a `compute_mask` of None stops Keras from warning that
      the mask is "destroyed" and from attaching it to the outputs. (Keras would
      still pass the Keras mask of an `x` that carries one, e.g. from
      `Embedding(mask_zero=True)`, as `mask`; mmt's embeddings attach none, and key
      padding belongs in `padding_mask`.)
    * Keras would rebuild a loaded layer from the shapes of every tensor argument of
      its first call (cache included); only `x` and `context` matter, so they are
      recorded by `_record_build_shapes` and replayed by `build_from_config`.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def compute_mask(self, inputs, previous_mask=None):
        return None

    def _record_build_shapes(self, x_shape, context_shape):
        self._build_shapes = {"x_shape": tuple(x_shape)}
        if context_shape is not None:
            self._build_shapes["context_shape"] = tuple(context_shape)

    def get_build_config(self):
        return {"shapes": getattr(self, "_build_shapes", None)}

    def build_from_config(self, config):
        if config and config.get("shapes"):
            self.build(**config["shapes"])


@keras.saving.register_keras_serializable(package="mmt")
class MultiHeadAttention(_AttentionLayer):
    """Multi-head dot-product attention with a fused QKV projection and a KV cache.

    Self-attention when called with `x` only: queries, keys and values come from one
    `[D, 3 * H * Dh]` matmul. Cross-attention when called with `context=`: a `[D, H*Dh]`
    query and a fused `[Dc, 2 * H * Dh]` key/value matmul. Which of the two a layer is
    gets fixed by its first call (its build); calling it the other way raises.

    Kernels are stored 2-D so that fan-in/fan-out based initialisers see the same
    shapes as the `Linear(D, 3D)` of ViT/MAE, and reshaping them is free.

    Args:
      num_heads: number of heads `H`.
      head_dim: per-head width `Dh`; defaults to `D // num_heads`.
      dropout: dropout rate on the attention probabilities.
      use_bias: add biases to the projections.
      kernel_initializer, bias_initializer: for all projections.
      output_dim: width of the output; defaults to the input width `D`.

    Call args:
      x: float `[B, Tq, D]`.
      context: optional float `[B, Tk, Dc]` for cross-attention.
      mask: optional bool `[Tq, Tk]`, `[B, Tq, Tk]`, `[B, 1, Tk]` or
        `[B, H or 1, Tq, Tk]`; True = may attend.
      training: enables attention dropout.
      cache: optional float `[B, 2, max_len, H, Dh]` (self-attention only) holding
        the keys (index 0) and values (index 1) of earlier positions.
      cache_index: int scalar (Python or tensor), the position of `x[:, 0]` in the
        cache. Required with `cache`.

    Returns:
      float `[B, Tq, output_dim]`, or `(output, new_cache)` when `cache` is given.
      With a cache the keys are the cache's `max_len` slots: by default query `i`
      sees slots `j <= cache_index + i` (causal decoding); a given `mask` must be
      `[.., Tq, max_len]` and is additionally limited to the slots written so far
      (`j < cache_index + Tq`), so a prefill can use e.g. rows of `prefix_mask`.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int | None = None,
        dropout: float = 0.0,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        output_dim: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.output_dim = output_dim
        self.dropout = dropout
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.dropout_layer = Dropout(dropout, dtype=self.dtype_policy)
        self.is_cross_attention = None

    def build(self, x_shape, context_shape=None):
        d = x_shape[-1]
        h = self.num_heads
        dh = self.head_dim or d // h
        if dh < 1:
            raise ValueError(f"width {d} is too small for {h} heads; set head_dim.")
        self._dh = dh
        self._out_dim = self.output_dim or d
        self.is_cross_attention = context_shape is not None
        if self.is_cross_attention:
            self.query_kernel, self.query_bias = self._dense("query", d, h * dh)
            self.kv_kernel, self.kv_bias = self._dense("kv", context_shape[-1], 2 * h * dh)
        else:
            self.qkv_kernel, self.qkv_bias = self._dense("qkv", d, 3 * h * dh)
        self.output_kernel, self.output_bias = self._dense("output", h * dh, self._out_dim)
        self._record_build_shapes(x_shape, context_shape)
        self.built = True

    def _dense(self, name, fan_in, fan_out):
        kernel = self.add_weight(
            name=f"{name}_kernel", shape=(fan_in, fan_out), initializer=self.kernel_initializer
        )
        bias = None
        if self.use_bias:
            bias = self.add_weight(
                name=f"{name}_bias", shape=(fan_out,), initializer=self.bias_initializer
            )
        return kernel, bias

    def _project(self, x, kernel, bias, n):
        """`x [B, T, D] @ kernel` -> `[B, T, n, H, Dh]` (one matmul for n projections)."""
        y = ops.matmul(x, kernel)
        if bias is not None:
            y = y + bias
        return ops.reshape(y, (*ops.shape(x)[:-1], n, self.num_heads, self._dh))

    def init_cache(self, batch_size: int, max_length: int, dtype=None):
        """Zeros float `[batch_size, 2, max_length, H, Dh]` for `call(cache=...)`."""
        if not self.built:
            raise ValueError("build the layer (call it once) before init_cache().")
        shape = (batch_size, 2, max_length, self.num_heads, self._dh)
        return ops.zeros(shape, dtype or self.compute_dtype)

    def call(self, x, context=None, mask=None, training=False, cache=None, cache_index=None):
        if (context is not None) != self.is_cross_attention:
            kind = "cross" if self.is_cross_attention else "self"
            raise ValueError(f"layer {self.name} was built for {kind}-attention.")
        if self.is_cross_attention:
            if cache is not None:
                raise ValueError("the KV cache is for self-attention only.")
            q = self._project(x, self.query_kernel, self.query_bias, 1)[:, :, 0]
            kv = self._project(context, self.kv_kernel, self.kv_bias, 2)
            k, v = kv[:, :, 0], kv[:, :, 1]  # [B, Tk, H, Dh]
        else:
            qkv = self._project(x, self.qkv_kernel, self.qkv_bias, 3)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, Dh] each
        if cache is not None:
            if cache_index is None:
                raise ValueError("cache_index is required with cache.")
            cache, k, v, mask = self._update_cache(cache, cache_index, k, v, mask)
        out = self._attend(q, k, v, mask, training)  # [B, Tq, H, Dh]
        out = ops.reshape(out, (*ops.shape(out)[:-2], self.num_heads * self._dh))
        out = ops.matmul(out, self.output_kernel)
        if self.output_bias is not None:
            out = out + self.output_bias
        return out if cache is None else (out, cache)

    def _update_cache(self, cache, cache_index, k, v, mask):
        """Write this step's keys/values at `cache_index`; attend over all slots."""
        tq = k.shape[1]
        max_len = cache.shape[2]
        kv = ops.stack([k, v], axis=1)  # [B, 2, Tq, H, Dh]
        kv = ops.cast(kv, cache.dtype)
        index = ops.cast(cache_index, "int32")
        zero = ops.zeros((), "int32")
        cache = ops.slice_update(cache, (zero, zero, index, zero, zero), kv)
        k = ops.cast(cache[:, 0], self.compute_dtype)  # [B, max_len, H, Dh]
        v = ops.cast(cache[:, 1], self.compute_dtype)
        slots = ops.arange(max_len, dtype="int32")[None, :]
        if mask is None:
            queries = index + ops.arange(tq, dtype="int32")[:, None]
            mask = slots <= queries  # [Tq, max_len], causal in absolute positions
        else:
            mask = combine_masks(mask, slots < index + tq)
        return cache, k, v, mask

    def _attend(self, q, k, v, mask, training):
        """q `[B, Tq, H, Dh]`, k/v `[B, Tk, H, Dh]` -> `[B, Tq, H, Dh]`."""
        # Scaling q (B*Tq*H*Dh values) is cheaper than scaling the logits (B*H*Tq*Tk).
        q = q * ops.cast(1.0 / math.sqrt(self._dh), q.dtype)
        logits = ops.einsum("bqhd,bkhd->bhqk", q, k)  # [B, H, Tq, Tk]
        probs = masked_softmax(logits, mask)  # float32
        probs = self.dropout_layer(ops.cast(probs, v.dtype), training=training)
        return ops.einsum("bhqk,bkhd->bqhd", probs, v)


    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            output_dim=self.output_dim,
            dropout=self.dropout,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        return config


__all__: Sequence[str] = (
    "MultiHeadAttention",
    "causal_mask",
    "combine_masks",
    "dalle_column_mask",
    "dalle_conv_mask",
    "dalle_row_mask",
    "full_mask",
    "mask_value",
    "masked_softmax",
    "padding_mask",
    "prefix_mask",
)
