"""The `shapes` data set as a tensorflow-datasets builder, `mmt_shapes`. Offline.

Importing this module registers the builder; preparing it generates the examples with
`mmt.data.shapes.generate` (nothing is downloaded):

    import tensorflow_datasets as tfds
    import mmt.data.shapes.tfds  # registers "mmt_shapes"

    ds = tfds.load("mmt_shapes/64", split="paired", data_dir="/tmp/tfds")

Configs `32`, `64` (default) and `128` hold the default `ShapesConfig` at that
resolution, with `DEFAULT_EXAMPLES` per split. Other sizes, seeds or held-out pairs go
through `builder_config`, under a name of their own (the prepared files live in
`data_dir/mmt_shapes/<config name>/<version>`, so two configs must not share a name):

    config = builder_config(32, name="tiny", examples_per_split={"paired": 8, "eval": 4})
    ds = tfds.load("mmt_shapes", split="eval", data_dir=tmp, builder_kwargs={"config": config})

Features: `key` (text), `image` (uint8 [R, R, 3]), `caption` (text) and `objects`, a
sequence of {`shape`, `color`, `size`: ClassLabels over SHAPES / COLORS / SIZES,
`cell`: int32 row * 3 + col}, sorted as in `Example.objects`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mmt.data import shapes

DEFAULT_EXAMPLES: tuple[tuple[str, int], ...] = (("paired", 10_000), ("image_only", 20_000),
                                                 ("text_only", 20_000), ("eval", 2_000))


@dataclasses.dataclass(eq=False)
class MmtShapesConfig(tfds.core.BuilderConfig):
    """A `mmt_shapes` config: which shapes, and how many examples of each split."""

    shapes: shapes.ShapesConfig = shapes.ShapesConfig()
    examples_per_split: tuple[tuple[str, int], ...] = DEFAULT_EXAMPLES


def builder_config(resolution: int = 64, *, name: str | None = None,
                   examples_per_split: Mapping[str, int] | None = None, **shapes_kwargs) -> MmtShapesConfig:
    """A config for `MmtShapes`.

    Args:
      resolution: image side, 32, 64 or 128.
      name: the config's name (default: the resolution); must differ between configs
        prepared in the same data_dir.
      examples_per_split: split -> count; splits left out are not generated. Default
        DEFAULT_EXAMPLES.
      **shapes_kwargs: other `ShapesConfig` fields (seed, held_out_combinations, ...).
    """
    counts = dict(DEFAULT_EXAMPLES if examples_per_split is None else examples_per_split)
    unknown = set(counts) - set(shapes.SPLITS)
    if unknown or any(n < 0 for n in counts.values()):
        raise ValueError(f"examples_per_split: splits must be among {shapes.SPLITS} with counts >= 0, got {counts}")
    config = shapes.ShapesConfig(resolution=resolution, **shapes_kwargs)
    return MmtShapesConfig(
        name=name or str(resolution),
        description=f"shapes at {resolution}x{resolution}, " + ", ".join(f"{s} {n}" for s, n in counts.items()),
        shapes=config,
        examples_per_split=tuple(counts.items()),
    )


class MmtShapes(tfds.core.GeneratorBasedBuilder):
    """Synthetic images of 1-3 coloured shapes with captions (mmt's embedded data set)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [builder_config(r) for r in shapes.RESOLUTIONS]
    DEFAULT_BUILDER_CONFIG_NAME = "64"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9's default looks the package up through `importlib_resources`, which
        # it imports lazily but does not install on Python >= 3.9 (ModuleNotFoundError
        # in download_and_prepare); the file is all it needs (to find checksums.tsv).
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        resolution = self.builder_config.shapes.resolution
        return self.dataset_info_from_configs(
            description=shapes.__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "key": tfds.features.Text(),
                "image": tfds.features.Image(shape=(resolution, resolution, 3), dtype=np.uint8),
                "caption": tfds.features.Text(),
                "objects": tfds.features.Sequence({
                    "shape": tfds.features.ClassLabel(names=list(shapes.SHAPES)),
                    "color": tfds.features.ClassLabel(names=list(shapes.COLORS)),
                    "size": tfds.features.ClassLabel(names=list(shapes.SIZES)),
                    "cell": np.int32,
                }),
            }),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # generated, nothing to download
        return {split: self._generate_examples(split, count)
                for split, count in self.builder_config.examples_per_split}

    def _generate_examples(self, split: str, count: int):
        for example in shapes.generate(self.builder_config.shapes, split, count):
            yield example.key, {
                "key": example.key,
                "image": example.image,
                "caption": example.caption,
                "objects": [{"shape": o.shape, "color": o.color, "size": o.size, "cell": o.cell}
                            for o in example.objects],
            }
