"""Gin plumbing: strict parsing (typos fail before work starts), REQUIRED, config files."""

import gin
import pytest

from mmt import config as mmt_config
from mmt import quickstart
from mmt.data import shapes

# What `python -m mmt.quickstart` registers before it parses its gin files.
mmt_config.configurable_entry(quickstart.run_chain, "quickstart")


def _probe(a, b=2, **kwargs):
    """A **kwargs callable: plain gin would accept any parameter name for it."""
    return a, b, kwargs


class _Base:
    def __init__(self, name=None, dtype=None):
        self.name, self.dtype = name, dtype


class _Layer(_Base):
    """Keras-style: **kwargs forwarded to a base class with named parameters."""

    def __init__(self, units=1, **kwargs):
        super().__init__(**kwargs)
        self.units = units


probe = mmt_config.configurable_entry(_probe, "test_probe")
layer = mmt_config.configurable_entry(_Layer, "TestLayer")


@pytest.fixture(autouse=True)
def _clean_gin():
    mmt_config.reset()
    yield
    mmt_config.reset()


def test_quickstart_config_parses_and_binds():
    mmt_config.parse(["quickstart.gin"], ["SHAPES_SEED = 7"])
    cfg = gin.get_configurable("ShapesConfig")()
    assert cfg == shapes.ShapesConfig(resolution=32, min_objects=1, max_objects=3, seed=7)


def test_gin_file_found_by_repo_relative_path(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # outside the repo: 'gin/...' still resolves
    mmt_config.parse(["gin/quickstart_tiny.gin"])
    assert gin.query_parameter("quickstart.num_shards") == 2


def test_typo_of_kwargs_callable_parameter_fails():
    # Plain gin accepts `test_probe.bb` because _probe takes **kwargs.
    with pytest.raises(mmt_config.ConfigError, match=r"test_probe\.bb.*did you mean 'b'"):
        mmt_config.parse([], ["test_probe.a = 1", "test_probe.bb = 3"])


def test_kwargs_followed_up_the_class_hierarchy():
    mmt_config.parse([], ["TestLayer.units = 3", "TestLayer.name = 'x'"])
    assert gin.get_configurable("TestLayer")().name == "x"
    mmt_config.reset()
    with pytest.raises(mmt_config.ConfigError, match=r"TestLayer\.nmae"):
        mmt_config.parse([], ["TestLayer.nmae = 'x'"])


def test_typo_in_gin_file_names_binding(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'quickstart.gin'\nShapesConfig.resolutoin = 32\n")
    with pytest.raises(mmt_config.ConfigError, match="resolutoin"):
        mmt_config.parse([bad])


def test_typo_in_gin_param_names_binding():
    with pytest.raises(mmt_config.ConfigError, match="resolutoin"):
        mmt_config.parse(["quickstart.gin"], ["ShapesConfig.resolutoin = 32"])


def test_unknown_configurable_fails():
    with pytest.raises(mmt_config.ConfigError, match="ShapeConfig"):
        mmt_config.parse(["quickstart.gin"], ["ShapeConfig.resolution = 32"])


def test_undefined_macro_fails():
    with pytest.raises(mmt_config.ConfigError, match="SEEED"):
        mmt_config.parse(["quickstart.gin"], ["ShapesConfig.seed = %SEEED"])


def test_missing_required_fails_naming_binding():
    with pytest.raises(mmt_config.ConfigError, match="SHAPES_RESOLUTION.*REQUIRED"):
        mmt_config.parse(["data/shapes.gin"])
    mmt_config.reset()
    mmt_config.parse(["data/shapes.gin"], ["SHAPES_RESOLUTION = 32"])
    assert gin.get_configurable("ShapesConfig")().resolution == 32


def test_missing_gin_file_names_it():
    with pytest.raises(mmt_config.ConfigError, match="no_such_file.gin"):
        mmt_config.parse(["no_such_file.gin"])


def test_config_and_operative_config_written(tmp_path):
    mmt_config.parse([], ["test_probe.a = 5"])
    full = mmt_config.write_config(tmp_path)
    assert "test_probe.a = 5" in full.read_text()
    assert probe() == (5, 2, {})
    operative = mmt_config.write_config(tmp_path, operative=True)
    text = operative.read_text()
    assert "test_probe.a = 5" in text and "test_probe.b = 2" in text


def test_unused_bindings_are_named_with_their_file_and_line(tmp_path):
    path = tmp_path / "run.gin"
    path.write_text("UNUSED = 3\nUSED = 4\ntest_probe.a = %USED\nTestLayer.units = 5\n")
    mmt_config.parse([path], ["EXTRA = 1"])
    probe()  # TestLayer is never called: its binding is unused; so are UNUSED and EXTRA
    unused = mmt_config.unused_bindings()
    assert sorted(unused) == sorted([f"macro UNUSED ({path}:1)", f"TestLayer.units ({path}:4)",
                                     "macro EXTRA (--gin_param 'EXTRA = 1')"])
    with pytest.raises(mmt_config.ConfigError, match=r"TestLayer.units .*run.gin:4.*--allow_unused_bindings"):
        mmt_config.check_unused_bindings()
    with pytest.warns(UserWarning, match="UNUSED"):
        mmt_config.check_unused_bindings(allow=True)


def test_required_macro_set_to_none_is_unused_on_purpose(tmp_path):
    base, top = tmp_path / "base.gin", tmp_path / "top.gin"
    base.write_text("DIR = %gin.REQUIRED\nOTHER = %gin.REQUIRED\ntest_probe.a = %DIR\n")
    top.write_text(f"include '{base}'\nDIR = None\nOTHER = 'x'\ntest_probe.a = 1\n")
    mmt_config.parse([top])
    probe()
    # DIR = None declares it unused; OTHER was given a value that nothing reads.
    assert [u.split(" (")[0] for u in mmt_config.unused_bindings()] == ["macro OTHER"]


def test_describe_binding_names_the_macro_behind_it():
    mmt_config.parse([], ["SIZE = 3", "test_probe.a = %SIZE", "test_probe.b = {'k': %SIZE}"])
    assert mmt_config.describe_binding("test_probe.a") == "SIZE (test_probe.a)"
    assert mmt_config.describe_binding("test_probe.b['k']") == "SIZE (test_probe.b['k'])"
    assert mmt_config.describe_binding("TestLayer.units") == "TestLayer.units"


def test_unbalanced_bracket_names_the_binding():
    with pytest.raises(mmt_config.ConfigError, match=r"--gin_param 'test_probe.a = \(5'"):
        mmt_config.parse([], ["test_probe.b = 2", "test_probe.a = (5"])
