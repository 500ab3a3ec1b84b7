"""Hardware in one place: which `tf.distribute.Strategy` a run uses, and its XLA policy.

Models never see devices; the trainer takes the strategy this module returns.

* `--tpu=NAME` (or `local` on a TPU VM): TPUClusterResolver + TPUStrategy.
* `TF_CONFIG` naming several workers: MultiWorkerMirroredStrategy.
* more than one GPU: MirroredStrategy.
* otherwise the default strategy (one CPU or GPU).

XLA (`jit_compile`) is chosen per strategy (DESIGN.md §5): under TPUStrategy the step is
compiled by the TPU runtime anyway and asking Keras for `jit_compile` there fails on the
host (keras-team/keras#19448); under MirroredStrategy on CPU it fails because replica
variables live on several host devices; elsewhere it is on, so CPU runs compile exactly
the graph a TPU would.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf


def split_cpu(num_devices: int) -> None:
    """Splits the host CPU into `num_devices` logical devices (tests of multi-replica code).

    Must run before TensorFlow initialises its devices.
    """
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)]
    )


def _tf_config_workers() -> int:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return 0
    try:
        cluster = json.loads(raw).get("cluster", {})
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from e
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


def make_strategy(tpu: str | None = None, *, cpu_replicas: int | None = None) -> tf.distribute.Strategy:
    """Returns the strategy for this process's hardware.

    Args:
      tpu: a TPU name, `local` for a TPU VM, or None for no TPU.
      cpu_replicas: with no accelerator, mirror over this many logical CPU devices
        (created by `split_cpu`); used to test that results do not depend on the
        replica count.
    """
    if tpu:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=None if tpu == "local" else tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if _tf_config_workers() > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    if cpu_replicas and cpu_replicas > 1:
        cpus = tf.config.list_logical_devices("CPU")
        if len(cpus) < cpu_replicas:
            raise ValueError(
                f"cpu_replicas={cpu_replicas} but only {len(cpus)} logical CPU devices exist; "
                "call mmt.training.distribute.split_cpu(n) before TensorFlow initialises its devices"
            )
        # CollectiveAllReduce keys its ops by (group, instance) numbers that restart
        # at the same values for every MirroredStrategy, and the runtime caches each
        # key's shape for the whole process: a second CPU-mirrored strategy in one
        # process then fails with "Shape mismatch in the collective instance".
        # Reducing through one device has no process-wide keys.
        devices = [d.name for d in cpus[:cpu_replicas]]
        return tf.distribute.MirroredStrategy(
            devices, cross_device_ops=tf.distribute.ReductionToOneDevice(reduce_to_device=devices[0]))
    return tf.distribute.get_strategy()


def use_jit_compile(strategy: tf.distribute.Strategy) -> bool:
    """Whether the train step should be compiled with `jit_compile=True`."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return False  # compiled by the TPU runtime; explicit jit_compile fails on the host
    if strategy.num_replicas_in_sync > 1 and not tf.config.list_logical_devices("GPU"):
        return False  # MirroredStrategy over CPU devices cannot be XLA-compiled
    return True
