"""The device mesh of a run and multi-host start-up.

    initialize_distributed()                         # a no-op on one host; TPU pods, SLURM, Open MPI: automatic
    mesh = make_mesh(MeshConfig(data=-1, fsdp=4))    # ("data", "fsdp", "tensor") = (n / 4, 4, 1)

Axes:
  data    pure data parallelism: params replicated, the batch split
  fsdp    fully sharded data parallelism: the batch split and the large params (and their optimizer state) split,
          gathered per layer when used
  tensor  tensor parallelism inside a layer: attention heads and MLP hidden units split (see `sharding`)
Any axis may be 1; one may be -1 (the devices left over). The batch is split over (data, fsdp).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    @classmethod
    def from_config(cls, section) -> MeshConfig:
        return cls(int(section["data"]), int(section["fsdp"]), int(section["tensor"]))

    def shape(self, device_count: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) sizes for `device_count` devices; -1 takes what is left."""
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))}: each axis must be >= 1, "
                             "and at most one may be -1")
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if device_count % fixed:
                raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))}: {device_count} devices are not "
                                 f"a multiple of {fixed}")
            sizes[sizes.index(-1)] = device_count // fixed
        if math.prod(sizes) != device_count:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices; "
                             f"there are {device_count}")
        return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default all, of every process).

    jax.make_mesh orders the devices so that the inner axes (tensor, then fsdp) fall on the fastest links
    (within a host, a TPU slice's ICI ring) and data runs across hosts.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = config.shape(len(devices))
    # Auto axes: GSPMD propagates shardings from the params, the batch and the logical constraints (no explicit
    # sharding in the types of every intermediate)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


# Environment variables that mark a multi-process launch jax.distributed.initialize() can configure itself from.
_LAUNCHERS = {
    "JAX_COORDINATOR_ADDRESS": lambda v: bool(v),
    "SLURM_NTASKS": lambda v: int(v) > 1,
    "OMPI_COMM_WORLD_SIZE": lambda v: int(v) > 1,
    "TPU_WORKER_HOSTNAMES": lambda v: "," in v,  # a multi-host TPU slice
}


def launched_multi_process() -> bool:
    """Whether this process was started as one of several (by a TPU pod, SLURM, mpirun or JAX_* variables)."""
    for name, test in _LAUNCHERS.items():
        value = os.environ.get(name)
        if value:
            try:
                if test(value):
                    return True
            except ValueError:
                continue
    return False


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Join the processes of a multi-host run; call before anything else touches jax devices.

    Explicit arguments (`--coordinator 10.0.0.1:1234 --num_processes 2 --process_id 0`) win; otherwise a
    TPU pod, a SLURM or Open MPI job, or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID make jax
    find its peers itself; a plain single-host run does nothing. Returns whether jax.distributed started.
    """
    explicit = coordinator_address or num_processes is not None or process_id is not None
    if not explicit and not launched_multi_process():
        return False
    if explicit and not (coordinator_address and num_processes is not None and process_id is not None):
        raise ValueError("multi-host start: give all of coordinator address, process count and process id "
                         f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r}), or none of them")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    logging.info("process %d of %d, %d local of %d devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True


def target_devices(target: str | None) -> list:
    """The devices a program is compiled for: None or "local", this process's; "tpu:<topology>" (e.g. tpu:v5e:2x4,
    tpu:v5e:8x8), the chips of a TPU slice described by `jax.experimental.topologies`, for compiling ahead of time
    on a machine without them (XLA:TPU's own program and memory figures; needs the `libtpu` package importable,
    bench/README.md). Their `platform` is what `models.attention.compiling_for` takes."""
    if target in (None, "", "local"):
        return list(jax.local_devices())
    platform, _, topology = target.partition(":")
    if platform != "tpu" or not topology:
        raise ValueError(f"target {target!r}: expected local or tpu:<topology> (e.g. tpu:v5e:2x4)")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as e:  # libtpu missing or an unknown topology: jax raises several kinds
        raise ValueError(f"target {target!r}: no TPU topology {topology!r} ({type(e).__name__}: {e}); compiling "
                         "for TPU needs the libtpu package (bench/README.md)") from e


_OOM = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds")


def out_of_memory(message: str) -> int | None:
    """The temporaries' bytes in XLA:TPU's "Ran out of memory" refusal of a compile (None for any other error): a
    plan compiled for a TPU target reports what a program over the chip's memory would need."""
    m = _OOM.search(message)
    if not m:
        return None
    return int(float(m[1]) * 1024 ** "_KMGT".index(m[2] or "_"))
