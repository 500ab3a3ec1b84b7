"""Apache Beam pipelines that turn image-caption corpora into mmt's TFRecords.

Each stage is a labelled `PTransform`; models load in `DoFn.setup`; every dropped
input is counted and dead-lettered with its reason. They run on DirectRunner locally
and on Dataflow at scale (`--runner=DataflowRunner --setup_file=./setup.py`).
The record format they write is `mmt.data.features`.
"""
