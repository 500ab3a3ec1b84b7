"""Pre-LayerNorm transformer blocks (ViT / MAE / MAGE style), `keras.ops` only.

`TransformerStack` is the trunk of every mmt model: the ITIT image-text encoder and
MAGE-style image decoder (bidirectional), the GIT-style text decoder (`prefix_mask`),
UPGen's encoder, M3AE's encoder and decoder, and DALL-E's decoder-only transformer
(a different sparse mask per layer, passed as a list).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import keras
from keras import ops

from mmt.layers import gradient_scaling as gs
from mmt.layers.attention import MultiHeadAttention, _AttentionLayer
from mmt.layers.dropout import Dropout


def _gelu_or(activation, approximate: bool):
    if activation == "gelu":
        # The tanh approximation (GPT-2, BERT, MaskGIT) skips erf, which XLA on CPU
        # lowers to a long polynomial; the two differ by < 1e-3.
        return lambda x: keras.activations.gelu(x, approximate=approximate)
    return keras.activations.get(activation)


@keras.saving.register_keras_serializable(package="mmt")
class Mlp(keras.layers.Layer):
    """Transformer feed-forward block: Dense -> activation -> dropout -> Dense -> dropout.

    Args:
      hidden_dim: width of the hidden layer (ViT's `mlp_dim`, usually 4 * D).
      dropout: dropout after the activation and after the output projection (ViT).
      activation: any Keras activation name; "gelu" honours `approximate_gelu`.
      approximate_gelu: use the tanh approximation of GELU.
      output_dim: output width; defaults to the input width `D`.

    Call: float `[B, T, D]` -> float `[B, T, output_dim or D]`.
    """

    def __init__(
        self,
        hidden_dim: int,
        dropout: float = 0.0,
        activation="gelu",
        approximate_gelu: bool = True,
        output_dim: int | None = None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.output_dim = output_dim
        self.dropout = dropout
        self.activation = activation
        self.approximate_gelu = approximate_gelu
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self._act = _gelu_or(activation, approximate_gelu)
        self.fc1 = keras.layers.Dense(hidden_dim, name="fc1", **self._dense_kwargs())
        self.fc2 = None
        self.dropout_layer = Dropout(dropout, dtype=self.dtype_policy)

    def build(self, input_shape):
        self.fc1.build(input_shape)
        out = self.output_dim or input_shape[-1]
        self.fc2 = keras.layers.Dense(out, name="fc2", **self._dense_kwargs())
        self.fc2.build((*input_shape[:-1], self.hidden_dim))
        self.built = True

    def _dense_kwargs(self):
        return dict(
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            dtype=self.dtype_policy,
        )

    def call(self, x, training=False):
        x = self.dropout_layer(self._act(self.fc1(x)), training=training)
        return self.dropout_layer(self.fc2(x), training=training)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.output_dim or input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            output_dim=self.output_dim,
            dropout=self.dropout,
            activation=self.activation,
            approximate_gelu=self.approximate_gelu,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package="mmt")
class TransformerBlock(_AttentionLayer):
    """Pre-LN block: `x + attn(ln(x))` [`+ cross_attn(ln(x), context)`] `+ mlp(ln(x))`.

    Pre-LayerNorm as in ViT (Dosovitskiy et al., 2021), MAE/M3AE and MAGE, which the
    ITIT encoder and decoders follow (ITIT App. A); DALL-E's resblocks are pre-LN too.

    Args:
      num_heads: attention heads.
      mlp_dim: hidden width of the MLP.
      dropout: dropout on the attention output and inside the MLP.
      attention_dropout: dropout on the attention probabilities.
      norm_epsilon: LayerNorm epsilon (1e-6 as ViT/big_vision).
      approximate_gelu: tanh GELU in the MLP.
      cross_attention: add a cross-attention sub-block attending to `context`.
      drop_path: stochastic-depth rate: each residual branch is dropped for a whole
        example with this probability during training (Huang et al., 2016; DeiT/MAE).
      head_dim: per-head width; defaults to `D // num_heads`.
      use_bias, kernel_initializer: for every projection.
      gradient_scaling: DALL-E's per-resblock gradient scaling (§2.4,
        `mmt.layers.gradient_scaling`): the residual stream stays float32 and each
        branch back-propagates under this block's own dynamic scale. None follows
        `gradient_scaling.active` (the trainer's setting); False, True or a
        `GradientScaling` / dict decide here.

    Call args:
      x: float `[B, T, D]` (float32 under gradient scaling).
      mask: bool self-attention mask (`[T, Tk]`, `[B, T, Tk]`, `[B, 1, Tk]`).
      context: float `[B, S, Dc]`, required iff `cross_attention`.
      context_mask: bool mask over context keys (`[B, 1, S]`, `[T, S]`, ...).
      training: enables dropout and drop path.
      cache, cache_index: self-attention KV cache `[B, 2, max_len, H, Dh]`, see
        `MultiHeadAttention`.

    Returns:
      float `[B, T, D]`, or `(output, new_cache)` when `cache` is given.
    """

    def __init__(
        self,
        num_heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        norm_epsilon: float = 1e-6,
        approximate_gelu: bool = True,
        cross_attention: bool = False,
        drop_path: float = 0.0,
        head_dim: int | None = None,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        gradient_scaling=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.gradient_scaling = gs.resolve(gradient_scaling)
        self.gradient_scale = None
        if self.gradient_scaling is not None:
            # DALL-E §2.4: the identity path stays float32; only the branches autocast.
            self.autocast = False
            self.gradient_scale = gs.ResblockGradientScale(self.gradient_scaling, name="gradient_scale")
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.norm_epsilon = norm_epsilon
        self.approximate_gelu = approximate_gelu
        self.cross_attention = cross_attention
        self.drop_path = drop_path
        self.head_dim = head_dim
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

        policy = self.dtype_policy
        attention = dict(
            num_heads=num_heads,
            head_dim=head_dim,
            dropout=attention_dropout,
            use_bias=use_bias,
            kernel_initializer=self.kernel_initializer,
            dtype=policy,
        )

        def norm(name):
            # Keras' LayerNormalization computes mean/variance in float32 even for bf16
            # inputs (`ops.layer_normalization` upcasts) and returns the compute dtype.
            return keras.layers.LayerNormalization(epsilon=norm_epsilon, name=name, dtype=policy)

        self.attention_norm = norm("attention_norm")
        self.attention = MultiHeadAttention(name="attention", **attention)
        if cross_attention:
            self.cross_attention_norm = norm("cross_attention_norm")
            self.cross_attention_layer = MultiHeadAttention(name="cross_attention", **attention)
        self.mlp_norm = norm("mlp_norm")
        self.mlp = Mlp(
            mlp_dim,
            dropout=dropout,
            approximate_gelu=approximate_gelu,
            kernel_initializer=self.kernel_initializer,
            name="mlp",
            dtype=policy,
        )
        self.dropout_layer = Dropout(dropout, dtype=policy)
        # One keep/drop decision per example: noise shape [B, 1, 1].
        self.drop_path_layer = Dropout(
            drop_path, noise_shape=(None, 1, 1), dtype=policy
        )

    def build(self, x_shape, context_shape=None):
        if self.cross_attention and context_shape is None:
            raise ValueError(f"{self.name} has cross_attention=True: pass context=.")
        for norm in (self.attention_norm, self.mlp_norm):
            norm.build(x_shape)
        self.attention.build(x_shape)
        if self.cross_attention:
            self.cross_attention_norm.build(x_shape)
            self.cross_attention_layer.build(x_shape, context_shape)
        self.mlp.build(x_shape)
        if self.gradient_scale is not None:
            self.gradient_scale.build()
        self._record_build_shapes(x_shape, context_shape)
        self.built = True

    def _branch_input(self, x):
        """What a residual branch reads: under gradient scaling, `x` cast to the compute
        dtype with its gradient filtered and unscaled on the way back (DALL-E Figure 4)."""
        if self.gradient_scale is None or x is None:
            return x
        return self.gradient_scale.entry(x, self.compute_dtype)

    def _residual(self, x, branch, training):
        branch = self.drop_path_layer(branch, training=training)
        if self.gradient_scale is not None:
            # Back to the float32 identity path; the gradient is scaled on the way in.
            branch = self.gradient_scale.exit(branch, x.dtype)
        return x + branch

    def call(
        self,
        x,
        mask=None,
        context=None,
        context_mask=None,
        training=False,
        cache=None,
        cache_index=None,
    ):
        h = self.attention_norm(self._branch_input(x))
        if cache is None:
            h = self.attention(h, mask=mask, training=training)
        else:
            h, cache = self.attention(
                h, mask=mask, training=training, cache=cache, cache_index=cache_index
            )
        x = self._residual(x, self.dropout_layer(h, training=training), training)
        if self.cross_attention:
            h = self.cross_attention_norm(self._branch_input(x))
            # The context's gradient leaves the block too: filtered and unscaled as well.
            h = self.cross_attention_layer(h, context=self._branch_input(context), mask=context_mask,
                                           training=training)
            x = self._residual(x, self.dropout_layer(h, training=training), training)
        x = self._residual(x, self.mlp(self.mlp_norm(self._branch_input(x)), training=training), training)
        return x if cache is None else (x, cache)


    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            norm_epsilon=self.norm_epsilon,
            approximate_gelu=self.approximate_gelu,
            cross_attention=self.cross_attention,
            drop_path=self.drop_path,
            head_dim=self.head_dim,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            gradient_scaling=_scaling_config(self.gradient_scaling),
        )
        return config


def _scaling_config(settings):
    return False if settings is None else dataclasses.asdict(settings)


@keras.saving.register_keras_serializable(package="mmt")
class TransformerStack(_AttentionLayer):
    """`depth` `TransformerBlock`s and an optional final LayerNorm.

    Args:
      depth: number of blocks.
      num_heads, mlp_dim, dropout, attention_dropout, norm_epsilon, approximate_gelu,
        cross_attention, head_dim, use_bias, kernel_initializer: as `TransformerBlock`.
      drop_path: stochastic-depth rate of the *last* block; block `i` uses
        `drop_path * i / (depth - 1)` (linear rule of Huang et al. / DeiT / MAE).
      final_norm: apply a LayerNorm after the last block (pre-LN models need one).
      gradient_scaling: per-resblock gradient scaling of every block (DALL-E §2.4, see
        `TransformerBlock`); under it the stack casts its input to float32, keeps the
        residual stream float32, and its final LayerNorm runs in float32 (App. D keeps
        gains and biases in 32 bits), so the output is float32.

    Call args:
      x: float `[B, T, D]`.
      mask: one bool mask for every layer, or a list of `depth` masks (DALL-E uses a
        row / column / convolutional mask per layer, App. B.1).
      context, context_mask: for cross-attention blocks.
      training: enables dropout and drop path.
      cache: per-layer KV caches, either a list of `depth` tensors
        `[B, 2, max_len, H, Dh]` or one stacked tensor `[depth, B, 2, max_len, H, Dh]`
        (e.g. from `init_cache`); the new cache comes back in the same form.
      cache_index: int scalar, position of `x[:, 0]` in the caches.

    Returns:
      float `[B, T, D]`, or `(output, new_cache)` when `cache` is given.
    """

    def __init__(
        self,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        norm_epsilon: float = 1e-6,
        approximate_gelu: bool = True,
        cross_attention: bool = False,
        drop_path: float = 0.0,
        head_dim: int | None = None,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        final_norm: bool = True,
        gradient_scaling=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.gradient_scaling = gs.resolve(gradient_scaling)
        if self.gradient_scaling is not None:
            self.autocast = False  # the residual stream enters and stays float32
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.norm_epsilon = norm_epsilon
        self.approximate_gelu = approximate_gelu
        self.cross_attention = cross_attention
        self.drop_path = drop_path
        self.head_dim = head_dim
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.final_norm = final_norm
        self.blocks = [
            TransformerBlock(
                num_heads,
                mlp_dim,
                dropout=dropout,
                attention_dropout=attention_dropout,
                norm_epsilon=norm_epsilon,
                approximate_gelu=approximate_gelu,
                cross_attention=cross_attention,
                drop_path=drop_path * i / max(depth - 1, 1),
                head_dim=head_dim,
                use_bias=use_bias,
                kernel_initializer=self.kernel_initializer,
                gradient_scaling=self.gradient_scaling or False,
                name=f"block_{i}",
                dtype=self.dtype_policy,
            )
            for i in range(depth)
        ]
        self.norm = None
        if final_norm:
            self.norm = keras.layers.LayerNormalization(
                epsilon=norm_epsilon, name="final_norm",
                dtype="float32" if self.gradient_scaling is not None else self.dtype_policy,
            )

    def build(self, x_shape, context_shape=None):
        for block in self.blocks:
            block.build(x_shape, context_shape)
        if self.norm is not None:
            self.norm.build(x_shape)
        self._record_build_shapes(x_shape, context_shape)
        self.built = True

    def init_cache(self, batch_size: int, max_length: int, dtype=None):
        """Zeros float `[depth, batch_size, 2, max_length, H, Dh]` (built stack only)."""
        cache = self.blocks[0].attention.init_cache(batch_size, max_length, dtype)
        return ops.repeat(cache[None], self.depth, axis=0)

    def call(
        self,
        x,
        mask=None,
        context=None,
        context_mask=None,
        training=False,
        cache=None,
        cache_index=None,
    ):
        masks = mask if isinstance(mask, (list, tuple)) else [mask] * self.depth
        if len(masks) != self.depth:
            raise ValueError(f"got {len(masks)} masks for {self.depth} layers.")
        if self.gradient_scaling is not None:
            x = ops.cast(x, "float32")
        new_caches = []
        for i, block in enumerate(self.blocks):
            kwargs = dict(mask=masks[i], training=training)
            if self.cross_attention:
                kwargs.update(context=context, context_mask=context_mask)
            if cache is None:
                x = block(x, **kwargs)
            else:
                x, layer_cache = block(x, cache=cache[i], cache_index=cache_index, **kwargs)
                new_caches.append(layer_cache)
        if self.norm is not None:
            x = self.norm(x)
        if cache is None:
            return x
        if isinstance(cache, (list, tuple)):
            return x, new_caches
        return x, ops.stack(new_caches, axis=0)


    def get_config(self):
        config = super().get_config()
        config.update(
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            norm_epsilon=self.norm_epsilon,
            approximate_gelu=self.approximate_gelu,
            cross_attention=self.cross_attention,
            drop_path=self.drop_path,
            head_dim=self.head_dim,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            final_norm=self.final_norm,
            gradient_scaling=_scaling_config(self.gradient_scaling),
        )
        return config


__all__: Sequence[str] = ("Mlp", "TransformerBlock", "TransformerStack")
