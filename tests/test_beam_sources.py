"""Every source format, and the stages that decide between records, with TestPipeline + assert_that."""

import io
import json
import tarfile

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

import beam_helpers as h
from beam_pipelines import sources, transforms, writers
from beam_pipelines.config import TokenizeConfig
from beam_pipelines import items as items_module
from beam_pipelines.items import Item
from mmt.data import integrity, schema

OPTIONS = PipelineOptions(["--direct_running_mode=in_memory"])


def config(**kwargs) -> TokenizeConfig:
    return TokenizeConfig(image_tokenizer="unused", text_vocab="unused", output_dir="unused", **kwargs)


def read(c: TokenizeConfig, expected_items, expected_drops):
    """Runs ReadCorpus; items as (key, caption, image_ref or byte count), drops as (key, stage, reason)."""
    def describe(item: Item):
        image = item.image_ref if item.image_bytes is None else len(item.image_bytes)
        if item.image_array is not None:
            image = item.image_array.shape
        return item.key, item.caption, image

    with test_pipeline.TestPipeline(options=OPTIONS) as p:
        out = p | sources.ReadCorpus(c)
        assert_that(out["items"] | beam.Map(describe), equal_to(expected_items), label="items")
        assert_that(out["dropped"] | beam.Map(lambda d: (d.key, d.stage, d.reason)), equal_to(expected_drops),
                    label="drops")


def test_headerless_tsv_with_urls_and_paths(tmp_path):
    images = tmp_path / "images"
    (tmp_path / "cc3m.tsv").write_bytes(
        b"a dog on a beach\thttps://example.com/dog.jpg\n"
        b"\n"
        b"a local cat\tcats/1.jpg\n"
        b"an absolute cat\t" + str(images).encode() + b"/cats/2.jpg\n"
        b"an escape\tcats/../../secret.jpg\n"
        b"an ftp picture\tftp://example.com/x.jpg\n"
        b"a gs picture\tgs://bucket/x.jpg\n"
        b"too\tmany\tcolumns\n")
    read(config(source="tsv", input=str(tmp_path / "*.tsv"), columns=("caption", "url"), image_dir=str(images)),
         [("cc3m.tsv:1", "a dog on a beach", "https://example.com/dog.jpg"),
          ("cc3m.tsv:3", "a local cat", f"{images}/cats/1.jpg"),
          ("cc3m.tsv:4", "an absolute cat", f"{images}/cats/2.jpg")],
         [("cc3m.tsv:5", "read", "path_refused"), ("cc3m.tsv:6", "read", "url_refused"),
          ("cc3m.tsv:7", "read", "url_refused"), ("cc3m.tsv:8", "read", "bad_row")])


def test_csv_with_header_quoting_and_key_column(tmp_path):
    (tmp_path / "data.csv").write_text(
        'id,text,image\n'
        'a1,"a caption, with a comma",x.png\n'
        'a2,"a caption\nover two lines",y.png\n'
        ',no id,z.png\n')
    read(config(source="csv", input=str(tmp_path / "data.csv"), key_column="id", caption_column="text",
                image_column="image"),
         [("a1", "a caption, with a comma", f"{tmp_path}/x.png"),
          ("a2", "a caption\nover two lines", f"{tmp_path}/y.png")],
         [("data.csv:5", "read", "missing_column")])  # the quoted newline made row 2 two lines


def test_jsonl_rows(tmp_path):
    lines = [json.dumps({"caption": "good", "url": "https://a.example/1.jpg"}).encode(),
             b"{not json",
             b"[1, 2]",
             json.dumps({"url": "https://a.example/2.jpg"}).encode(),
             json.dumps({"caption": 7, "url": "https://a.example/3.jpg"}).encode(),
             '{"caption": "caf\u00e9", "url": "https://a.example/4.jpg"}'.encode("latin-1"),
             b'{"caption": "lone \\udc80 surrogate", "url": "https://a.example/5.jpg"}']
    (tmp_path / "rows.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    read(config(source="jsonl", input=str(tmp_path / "rows.jsonl")),
         [("rows.jsonl:1", "good", "https://a.example/1.jpg")],
         [("rows.jsonl:2", "read", "bad_row"), ("rows.jsonl:3", "read", "bad_row"),
          ("rows.jsonl:4", "read", "missing_column"), ("rows.jsonl:5", "read", "bad_row"),
          ("rows.jsonl:6", "read", "invalid_utf8"), ("rows.jsonl:7", "read", "invalid_utf8")])


def test_coco_captions(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "000001.jpg"}, {"id": 2, "file_name": "000002.jpg"}],
            "annotations": [{"id": 10, "image_id": 1, "caption": "a bus"},
                            {"id": 11, "image_id": 1, "caption": "a red bus"},
                            {"id": 12, "image_id": 2, "caption": "a tree"},
                            {"id": 13, "image_id": 3, "caption": "no such image"},
                            {"id": 14, "caption": "no image id"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    images = tmp_path / "train2017"
    read(config(source="coco", input=str(tmp_path / "captions.json"), image_dir=str(images)),
         [("captions.json:10", "a bus", f"{images}/000001.jpg"),
          ("captions.json:11", "a red bus", f"{images}/000001.jpg"),
          ("captions.json:12", "a tree", f"{images}/000002.jpg")],
         [("captions.json:13", "read", "missing_image"), ("captions.json:14", "read", "missing_column")])


def _tar(members) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_webdataset_shards(tmp_path):
    png = h.encode(h.smooth_image(0), "PNG")
    (tmp_path / "00000.tar").write_bytes(_tar([
        ("000.jpg", png), ("000.txt", b"first caption"),
        ("001.png", png), ("001.json", json.dumps({"caption": "from json"}).encode()),
        ("002.txt", b"no image"),
        ("003.jpg", png),
        ("004.jpg", png), ("004.txt", b"\xff\xfe not utf-8"),
    ]))
    good = _tar([("100.jpg", png), ("100.txt", b"kept before the damage"), ("101.jpg", png * 20),
                 ("101.txt", b"lost")])
    (tmp_path / "00001.tar").write_bytes(good[: len(good) // 2])  # cut inside 101.jpg
    read(config(source="webdataset", input=str(tmp_path / "*.tar")),
         [("00000.tar/000", "first caption", len(png)), ("00000.tar/001", "from json", len(png)),
          ("00001.tar/100", "kept before the damage", len(png))],
         [("00000.tar/002", "read", "missing_image"), ("00000.tar/003", "read", "missing_column"),
          ("00000.tar/004", "read", "invalid_utf8"), ("00001.tar/(unreadable after 101.jpg)", "read",
                                                     "corrupt_archive")])


def test_image_folder(tmp_path):
    for name in ("a.png", "sub/b.png"):
        (tmp_path / "imgs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / name).write_bytes(b"x")
    read(config(source="image_folder", input=f"{tmp_path}/imgs/*.png,{tmp_path}/imgs/sub/*.png"),
         [("a.png", None, f"{tmp_path}/imgs/a.png"), ("b.png", None, f"{tmp_path}/imgs/sub/b.png")], [])


def test_text_lines_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"first line\n\n  \nsecond line\r\n\xe9t\xe9\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n" + json.dumps({"x": 1}) + "\n")
    read(config(source="text", input=f"{tmp_path}/a.txt,{tmp_path}/b.jsonl", caption_column="text"),
         [("a.txt:1", "first line", None), ("a.txt:4", "second line", None), ("b.jsonl:1", "from jsonl", None)],
         [("a.txt:5", "read", "invalid_utf8"), ("b.jsonl:2", "read", "missing_column")])


def test_shapes_generator():
    read(config(source="shapes", split="image_only", num_examples=3, shapes_resolution=32),
         [(f"shapes/image_only/0/{i:08d}", None, (32, 32, 3)) for i in range(3)], [])


def test_glob_matching_nothing_fails(tmp_path):
    with pytest.raises(Exception, match="matches no file"):
        read(config(source="tsv", input=str(tmp_path / "*.tsv")), [], [])


def test_resolve_image_ref():
    base = "gs://bucket/images/"
    assert sources.resolve_image_ref("a/b.jpg", base) == ("gs://bucket/images/a/b.jpg", "", "")
    assert sources.resolve_image_ref("gs://bucket/images/c.jpg", base)[0] == "gs://bucket/images/c.jpg"
    assert sources.resolve_image_ref("gs://bucket/other/c.jpg", base)[1] == "path_refused"
    assert sources.resolve_image_ref("gs://bucket/images/../x", base)[1] == "path_refused"
    assert sources.resolve_image_ref("s3://bucket/images/c.jpg", base)[1] == "url_refused"
    assert sources.resolve_image_ref("HTTPS://x.example/a.jpg", base)[1] == ""
    assert sources.resolve_image_ref(" ", base)[1] == "missing_image"
    assert sources.glob_base("gs://b/dir/*/x-*.tar") == "gs://b/dir/"
    assert sources.glob_base("/data/file.tsv") == "/data/"


def test_symlink_leaving_the_image_directory_is_refused(tmp_path):
    """Issue 17 item 8: the inside-`--image_dir` check is on the resolved path."""
    images, outside = tmp_path / "images", tmp_path / "outside"
    (images / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"not for the corpus")
    (images / "ok.jpg").write_bytes(b"inside")
    (images / "escape.jpg").symlink_to(outside / "secret.jpg")
    (images / "sub" / "linked_dir").symlink_to(outside, target_is_directory=True)
    (images / "alias.jpg").symlink_to(images / "ok.jpg")  # a link that stays inside is fine
    base = str(images)
    ref, reason, detail = sources.resolve_image_ref("escape.jpg", base)
    assert (ref, reason) == (None, "path_refused") and str(outside / "secret.jpg") in detail
    assert sources.resolve_image_ref("sub/linked_dir/secret.jpg", base)[1] == "path_refused"
    assert sources.resolve_image_ref(str(images / "escape.jpg"), base)[1] == "path_refused"
    assert sources.resolve_image_ref("alias.jpg", base) == (str(images / "ok.jpg"), "", "")
    assert sources.resolve_image_ref("missing.jpg", base) == (str(images / "missing.jpg"), "", "")

    (tmp_path / "c.tsv").write_text("a\tok.jpg\nb\tescape.jpg\nc\tsub/linked_dir/secret.jpg\n")
    c = config(source="tsv", input=str(tmp_path / "c.tsv"), columns=("caption", "url"), image_dir=base)
    p = test_pipeline.TestPipeline(options=OPTIONS)
    out = p | sources.ReadCorpus(c)
    assert_that(out["items"] | beam.Map(lambda it: (it.key, it.image_ref)),
                equal_to([("c.tsv:1", str(images / "ok.jpg"))]), label="items")
    assert_that(out["dropped"] | beam.Map(lambda d: (d.key, d.stage, d.reason)),
                equal_to([("c.tsv:2", "read", "path_refused"), ("c.tsv:3", "read", "path_refused")]),
                label="drops")
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(
        MetricsFilter().with_namespace(items_module.COUNTER_NAMESPACE))["counters"]}
    assert counters["dead_letter/read/path_refused"] == 2


# -- stages that choose between records ------------------------------------------------


def test_dedupe_keeps_the_first_reference_and_all_its_captions():
    items = [Item("b", "s", caption="c1", image_ref="/i/1.jpg", content_hash="h"),
             Item("a", "s", caption="c2", image_ref="/i/1.jpg", content_hash="h"),
             Item("c", "s", caption="c3", image_ref="/i/0_copy.jpg", content_hash="h"),
             Item("d", "s", caption="c4", image_ref="/i/2.jpg", content_hash="other")]
    with test_pipeline.TestPipeline(options=OPTIONS) as p:
        out = p | beam.Create(items) | transforms.DedupeImages()
        assert_that(out["items"] | beam.Map(lambda it: it.key), equal_to(["c", "d"]), label="kept")
        assert_that(out["dropped"] | beam.Map(lambda d: (d.key, d.reason, d.detail)),
                    equal_to([("a", "duplicate_image", "same image bytes as c"),
                              ("b", "duplicate_image", "same image bytes as c")]), label="dropped")


def test_caption_filter_and_its_counters():
    items = [Item("ok", "s", caption="  fine  "), Item("empty", "s", caption=" \t"),
             Item("long", "s", caption="x" * 11), Item("long2", "s", caption="y" * 12), Item("image_only", "s")]
    p = test_pipeline.TestPipeline(options=OPTIONS)
    out = p | beam.Create(items) | transforms.Stage(transforms.FilterCaptionsFn(10))
    assert_that(out["items"] | beam.Map(lambda it: (it.key, it.caption)),
                equal_to([("ok", "fine"), ("image_only", None)]), label="kept")
    assert_that(out["dropped"] | beam.Map(lambda d: (d.key, d.reason)),
                equal_to([("empty", "empty_caption"), ("long", "caption_too_long"), ("long2", "caption_too_long")]),
                label="dropped")
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(
        MetricsFilter().with_namespace(items_module.COUNTER_NAMESPACE))["counters"]}
    assert counters == {"filtered/filter_caption/empty_caption": 1, "filtered/filter_caption/caption_too_long": 2}


def test_shard_writer_is_order_independent_and_refuses_duplicate_keys(tmp_path):
    records = [(f"k{i}", f"src{i}", schema.encode_example(f"k{i}", caption=f"c {i}", text_ids=[i + 4]))
               for i in range(20)]
    duplicate = ("k3", "another-source", schema.encode_example("k3", caption="other", text_ids=[9]))
    for name, order in (("forward", records + [duplicate]), ("reverse", [duplicate] + records[::-1])):
        with test_pipeline.TestPipeline(options=OPTIONS) as p:
            out = p | beam.Create(order) | writers.WriteShards(str(tmp_path / name), "text_only", 3)
            assert_that(out["shards"] | beam.Map(lambda s: s[2]) | beam.CombineGlobally(sum), equal_to([20]),
                        label="count")
            assert_that(out["dropped"] | beam.Map(lambda d: (d.key, d.source, d.reason)),
                        equal_to([("k3", "src3", "duplicate_key")]), label="dropped")
    for shard in schema.shard_names("text_only", 3):
        assert (tmp_path / "forward" / shard).read_bytes() == (tmp_path / "reverse" / shard).read_bytes()
    # The framing is TFRecord's: TensorFlow reads it back with checksums verified.
    assert integrity.find_corrupt_shards([tmp_path / "forward" / s for s in schema.shard_names("text_only", 3)]) == []
    assert np.sum([len(list(__import__("tensorflow").data.TFRecordDataset(str(tmp_path / "forward" / s))))
                   for s in schema.shard_names("text_only", 3)]) == 20
