"""The tokenize graph builds for Dataflow (gs:// paths, workers installed by --setup_file); nothing is submitted."""

import importlib.util
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, SetupOptions, WorkerOptions

from beam_pipelines import tokenize
from beam_pipelines.config import TokenizeConfig
from beam_pipelines.resources import TokenizerInfo

REPO = Path(__file__).parent.parent
STAGES = ("Read corpus", "Filter captions", "Load images", "Decode images", "Filter images", "Resize and crop",
          "Deduplicate images", "Tokenize images", "Tokenize text", "Encode records", "Write shards",
          "Write dead letters", "Count drops", "Finalize")


def dataflow_options(*extra):
    return PipelineOptions([
        "--runner=DataflowRunner", "--project=my-project", "--region=us-central1",
        "--temp_location=gs://my-bucket/tmp", "--staging_location=gs://my-bucket/staging",
        f"--setup_file={REPO / 'setup.py'}", "--experiments=use_runner_v2", "--machine_type=n2-standard-8",
        "--num_workers=4", "--max_num_workers=64", *extra])


def test_graph_builds_for_dataflow_without_submitting():
    options = dataflow_options()
    assert options.view_as(SetupOptions).setup_file.endswith("setup.py")
    assert options.view_as(GoogleCloudOptions).region == "us-central1"
    assert options.view_as(WorkerOptions).machine_type == "n2-standard-8"
    config = tokenize.normalise_paths(TokenizeConfig(
        source="tsv", input="gs://my-bucket/cc3m/*.tsv", columns=("caption", "url"),
        output_dir="gs://my-bucket/cc3m_tokens/", image_tokenizer="gs://my-bucket/vqgan",
        text_vocab="gs://my-bucket/spiece.model", num_shards=1024))
    assert config.output_dir == "gs://my-bucket/cc3m_tokens" and config.input.startswith("gs://")
    info = TokenizerInfo(image_fingerprint="sha256:vq", image_grid=(16, 16), image_vocab_size=1024,
                         image_size=256, text_fingerprint="sha256:spm", text_vocab_size=32000)
    pipeline = beam.Pipeline(options=options)
    assert type(pipeline.runner).__name__ == "DataflowRunner"
    tokenize.build_pipeline(pipeline, config, info)
    proto = pipeline.to_runner_api()  # pickles every DoFn, as submission would
    names = {t.unique_name for t in proto.components.transforms.values()}
    for stage in STAGES:
        assert stage in names, stage
    assert any(name.startswith("Tokenize images/Batch") for name in names)
    if importlib.util.find_spec("google.auth") and importlib.util.find_spec("apitools"):
        # With the `dataflow` extra installed, go as far as the job description.
        dry = beam.Pipeline(options=dataflow_options("--dry_run=True"))
        tokenize.build_pipeline(dry, config, info)
        dry.run()


def test_setup_file_ships_mmt_and_the_pipelines(tmp_path):
    """What Dataflow does with --setup_file: build an sdist that workers pip-install."""
    import tarfile

    from apache_beam.runners.portability.stager import Stager

    sdist = Stager._build_setup_package(str(REPO / "setup.py"), str(tmp_path))
    names = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    for module in ("beam_pipelines/tokenize.py", "beam_pipelines/fetch.py", "mmt/data/schema.py",
                   "mmt/tokenizers/image.py", "mmt/tokenizers/text.py"):
        assert module in names, module
