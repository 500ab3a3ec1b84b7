"""Apache Beam pipelines that turn image-caption corpora into mmt's TFRecords.

Each stage is a labelled `PTransform`; models load in `DoFn.setup`; every dropped
input is counted and dead-lettered with its reason. They run on DirectRunner locally
and on Dataflow at scale (`--runner=DataflowRunner --setup_file=./setup.py`).
The record format they write is `mmt.data.schema`.
"""

import logging as _logging


def _not_the_apitools_notice(record: _logging.LogRecord) -> bool:
    # Beam's BigQuery client package logs this at import when the optional `apitools`
    # (the `dataflow` extra) is missing; these pipelines use no BigQuery, and the line
    # would precede every run's output and every one-line error.
    return not str(record.msg).startswith("apitools not found")


_logging.getLogger().addFilter(_not_the_apitools_notice)
