"""Multi-process training on JAX's own engine: one process per host, `jax.distributed`, one global
mesh ``("data", "fsdp")``, sharded arrays, orbax checkpoints written by every process.

Each process runs the same training command. `initialize` joins the processes (flags, or the
environment: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; under SLURM
JAX's own detection fills them in); `make_mesh` lays the devices on the mesh
(several processes: ``data`` = processes, ``fsdp`` = devices per process; one process: one
device unless ``--mesh`` asks for more); `place` shards the training state
(each parameter's last axis over ``fsdp`` where it divides, the rest replicated; the 2:4 groups lie
along the kernels' input axis, which is never split); `global_batch` builds each step's batch from
the rows this process owns, with `jax.make_array_from_process_local_data`. On CPU the processes
talk through gloo collectives. ``experiments.launch`` starts N local processes for a try-out.

>>> mesh = make_mesh()
>>> mesh.axis_names, mesh.devices.shape
(('data', 'fsdp'), (1, 1))
"""

import argparse
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")


def _env_int(name: str, value: int | None) -> int | None:
    if value is not None:
        return value
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r}: must be an integer") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_devices: int | None = None) -> None:
    """Joins this process to the others (a no-op for one process); call before any JAX computation.

    Arguments left ``None`` come from the environment; under SLURM (``SLURM_NTASKS`` > 1 and nothing
    given) JAX detects them itself. ``local_devices`` splits a CPU into that many devices.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = _env_int("JAX_NUM_PROCESSES", num_processes)
    process_id = _env_int("JAX_PROCESS_ID", process_id)
    local_devices = _env_int("SSTE_LOCAL_DEVICES", local_devices)
    if local_devices is not None:
        if local_devices < 1:
            raise ValueError(f"local_devices={local_devices}: must be >= 1")
        jax.config.update("jax_num_cpu_devices", local_devices)
    slurm = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
    if num_processes is None and not slurm:
        if coordinator is not None or process_id is not None:
            raise ValueError("a coordinator or process id was given without the number of processes")
        return
    if num_processes is not None:
        if num_processes < 1:
            raise ValueError(f"num_processes={num_processes}: must be >= 1")
        if num_processes == 1:
            return
        if coordinator is None or process_id is None:
            raise ValueError(f"num_processes={num_processes} needs the coordinator address and this process's id "
                             "(--coordinator/--process-id, or JAX_COORDINATOR_ADDRESS/JAX_PROCESS_ID)")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id}: must be in [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only where the platform is CPU
    jax.distributed.initialize(coordinator, num_processes, process_id)


def initialize_from(args: argparse.Namespace) -> None:
    """`initialize` from the flags of `experiments.common.cli.add_distributed_args`."""
    initialize(args.coordinator, args.num_processes, args.process_id, args.local_devices)


def parse_mesh(text: str | None) -> dict[str, int] | None:
    """``"data=2,fsdp=2"`` -> ``{"data": 2, "fsdp": 2}``; ``None`` stays ``None`` (the default mesh)."""
    if not text:
        return None
    shape = {}
    for item in text.split(","):
        name, _, size = item.partition("=")
        if name not in AXES or name in shape or not size.isdigit() or int(size) < 1:
            raise ValueError(f"--mesh {text!r}: expected data=D,fsdp=F with positive integers")
        shape[name] = int(size)
    return shape


def make_mesh(shape: dict[str, int] | None = None) -> Mesh:
    """The global ``("data", "fsdp")`` mesh.

    Several processes: by default ``data`` = the processes and ``fsdp`` = the devices per process
    (parameters sharded within a host, the batch over every device); ``shape`` may give one or both
    sizes, whose product must be the number of devices. One process: by default its first device
    alone (a run's numbers do not depend on how many devices a machine happens to have); ``shape``
    takes the first ``data x fsdp`` devices.
    """
    n, several = jax.device_count(), jax.process_count() > 1
    shape = dict(shape or ({} if several else {"data": 1, "fsdp": 1}))
    data = shape.get("data", jax.process_count() if "fsdp" not in shape else None)
    fsdp = shape.get("fsdp", n // data if data else None)
    data = data if data is not None else n // fsdp
    if data * fsdp != n and (several or data * fsdp > n):
        raise ValueError(f"mesh data={data}, fsdp={fsdp} needs {data * fsdp} devices; there are {n}")
    devices = np.array(jax.devices()[: data * fsdp]).reshape(data, fsdp)
    return Mesh(devices, AXES, axis_types=(AxisType.Auto,) * 2)


def param_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """A parameter's last axis over ``fsdp`` where it divides (rank >= 2), else replicated."""
    fsdp = mesh.shape["fsdp"]
    if len(shape) >= 2 and fsdp > 1 and shape[-1] % fsdp == 0:
        return NamedSharding(mesh, P(*(None,) * (len(shape) - 1), "fsdp"))
    return NamedSharding(mesh, P())


def _put(leaf, sharding: NamedSharding):
    """``leaf`` (the same value on every process) as a global array with ``sharding``."""
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = _put(jax.random.key_data(leaf), NamedSharding(sharding.mesh, P()))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place(state, mesh: Mesh, sharded=lambda path: True):
    """``state`` laid on ``mesh``: leaves under a path where ``sharded(path)`` is true by
    `param_sharding`, the others replicated. Every process must pass the same values."""
    def put(path, leaf):
        if not hasattr(leaf, "shape"):
            return leaf
        spec = param_sharding(mesh, leaf.shape) if sharded(path) else NamedSharding(mesh, P())
        return _put(leaf, spec)

    return jax.tree_util.tree_map_with_path(put, state)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Micro-batches ``A x B x ...``: the batch axis ``B`` over every device."""
    return NamedSharding(mesh, P(None, AXES, *(None,) * (ndim - 2)))


def global_batch(mesh: Mesh, arrays) -> tuple:
    """The global arrays of one step from the host arrays ``A x B x ...`` that every process can
    compute (batches are a pure function of the step): each process hands over only its own rows."""
    out = []
    for a in arrays:
        a = np.asarray(a)
        sharding = batch_sharding(mesh, a.ndim)
        devices = mesh.devices.size
        if a.shape[1] % devices:
            raise ValueError(f"batch_size={a.shape[1]} must be a multiple of the mesh's {devices} devices")
        rows = sorted({index[1].indices(a.shape[1])[:2] for index in
                       sharding.addressable_devices_indices_map(a.shape).values()})
        start, stop = rows[0][0], rows[-1][1]
        if sum(b - a_ for a_, b in rows) != stop - start:
            raise ValueError(f"this process's devices hold non-contiguous rows {rows} of the batch")
        out.append(jax.make_array_from_process_local_data(sharding, a[:, start:stop], a.shape))
    return tuple(out)


def is_main() -> bool:
    """Whether this is process 0, the one that writes metrics, run files and plots."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (one small collective; ``flag`` itself for one process)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.bool_))))


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (a no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
