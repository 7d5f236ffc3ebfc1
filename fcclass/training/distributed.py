"""Distributed data-parallel training under torchrun: who this process is (rank, world size), the process group
(gloo on CPUs, nccl on GPUs), the shard of every batch each rank trains on, and the sums that make metrics the
job's rather than one rank's. Only rank 0 writes the run directory, checkpoints, logs and trackers.

``data.batch_size`` is the *global* batch: with N processes each rank trains on about batch_size / N images of
every batch, and each rank's loss is scaled so that the averaged gradient is exactly the gradient of the whole
batch. A config therefore means the same model and schedule whatever the number of processes."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from fcclass.device import SINGLE, Dist
from fcclass.errors import FcclassError
from fcclass.runs.summary import LAUNCH_COMMAND, command_line
from fcclass.training.rendezvous import rendezvous


class PeerFailed(FcclassError):
    """Another process of the job failed or was stopped while this one waited for it."""

    def __init__(self, message: str, error: BaseException) -> None:
        super().__init__(message)
        self.error = error  # what the process group raised


def from_env() -> Dist:
    """The job as torchrun (or SLURM's srun with the torchrun variables) describes it in the environment."""
    def number(name: str, default: int) -> int:
        raw = os.environ.get(name)
        try:
            return int(raw) if raw not in (None, "") else default
        except ValueError:
            raise FcclassError(f"The environment variable {name}={raw!r} is not a number; torchrun sets it, so start "
                               "distributed training with torchrun (see the README) rather than setting it by hand.") from None

    world = number("WORLD_SIZE", 1)
    if world <= 1:
        rank = number("RANK", 0)
        if rank != 0:  # this process would train alone and, not being rank 0, report nothing
            raise FcclassError(f"RANK={rank} is set but WORLD_SIZE is {os.environ.get('WORLD_SIZE') or 'not set'}: this process "
                               "is not part of a distributed job. Unset RANK to train with one process, or start the job with "
                               "torchrun (or fcclass train --nproc-per-node N), which sets RANK, WORLD_SIZE and the rest.")
        return SINGLE
    rank, local_rank = number("RANK", 0), number("LOCAL_RANK", 0)
    local_world = number("LOCAL_WORLD_SIZE", world)
    if not 0 <= rank < world or not 0 <= local_rank < local_world:
        raise FcclassError(f"Inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}, "
                           f"LOCAL_WORLD_SIZE={local_world}.")
    return Dist(rank, world, local_rank, local_world)


def backend(device_type: str) -> str:
    """The process group's backend for a device: nccl between GPUs, gloo between CPUs."""
    return "nccl" if device_type == "cuda" else "gloo"


SYNC_BATCHNORM_NEEDS_CUDA = ("train.sync_batchnorm needs CUDA GPUs (PyTorch's SyncBatchNorm does not run on the CPU); remove it "
                             "to train on CPUs, where each process normalises its part of the batch.")


def device_for(job: Dist, name: str) -> str:
    """The device name a rank trains on: with CUDA, the GPU of its local rank (torchrun starts one process per GPU)."""
    if not job.enabled:
        return name
    if name == "mps":
        raise FcclassError("Distributed training does not support MPS; use train.device=cpu (gloo) or CUDA GPUs (nccl).")
    if name in ("auto", "cuda") or name.startswith("cuda:"):
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            if job.local_rank >= count:
                raise FcclassError(f"This machine has {count} GPU(s) but torchrun started {job.local_world} processes on it; "
                                   f"use --nproc-per-node {count} (one process per GPU).")
            return f"cuda:{job.local_rank}"
        if name != "auto":
            raise FcclassError(f"train.device is '{name}' but CUDA is not available here; use auto or cpu (gloo).")
        return "cpu"
    return name


def init(name: str) -> tuple[Dist, str]:
    """Join the job's process group if torchrun started this process (once per process), and return this rank and
    the device it trains on: nccl for GPUs, gloo for CPUs."""
    job = from_env()
    if not job.enabled:
        return job, name
    import torch.distributed as dist

    device = device_for(job, name)
    if not dist.is_initialized():
        kind = backend(torch.device(device).type)
        # torchrun's agents have met already (its own --rdzv timeout); variables set by hand meet here, within a bound
        store = {} if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else {
            "store": rendezvous(job), "rank": job.rank, "world_size": job.world}
        try:
            if kind == "nccl":
                torch.cuda.set_device(device)
                dist.init_process_group(kind, device_id=torch.device(device), **store)
            else:
                dist.init_process_group(kind, **store)
        except (RuntimeError, ValueError) as e:
            raise FcclassError(f"Cannot join the distributed job ({job.label}, backend {kind}): {str(e).splitlines()[0]}. "
                               "Check that every node can reach --rdzv-endpoint (or MASTER_ADDR:MASTER_PORT) and that all "
                               "nodes were started with the same --nnodes and --nproc-per-node.") from None
    return job, device


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def main_first(job: Dist) -> Iterator[None]:
    """Run the body on each machine's first process before the others (downloads, unpacking, caches that every
    process of a machine shares would otherwise be written by several at once)."""
    if job.enabled and job.local_rank != 0:
        barrier(job)
    yield
    if job.enabled and job.local_rank == 0:
        barrier(job)


def barrier(job: Dist) -> None:
    if job.enabled:
        import torch.distributed as dist

        _collective(job, dist.barrier)


def shard(idx: torch.Tensor, job: Dist) -> torch.Tensor:
    """This rank's part of one global batch (or of a whole split): contiguous, sizes differing by at most one."""
    return torch.tensor_split(idx, job.world)[job.rank] if job.enabled else idx


def batch_loss(loss_fn: torch.nn.CrossEntropyLoss, logits: torch.Tensor, y: torch.Tensor, global_: int, job: Dist) -> torch.Tensor:
    """This rank's part of the mean loss of the job's whole batch of ``global_`` images (the loss itself with one
    process): the parts add up to it over the ranks, so DDP's averaged gradient of ``part * world`` is its gradient.
    The mean is over the whole batch's images, or with class weights over the sum of its labels' weights, as torch's
    weighted mean (label smoothing included): sum_i w_{y_i} l_i / sum_i w_{y_i}, that sum taken over every rank (one
    scalar), not this rank's part alone."""
    if not job.enabled:
        return loss_fn(logits, y)
    total = torch.nn.functional.cross_entropy(logits, y, weight=loss_fn.weight, reduction="sum",
                                              label_smoothing=loss_fn.label_smoothing)
    return total / (global_ if loss_fn.weight is None else all_sum(loss_fn.weight[y].sum(), job))


def all_sum(values: torch.Tensor, job: Dist) -> torch.Tensor:
    """The element-wise sum of ``values`` over every rank (the values themselves with one process)."""
    if not job.enabled:
        return values
    import torch.distributed as dist

    out = values.clone()
    _collective(job, dist.all_reduce, out)
    return out


def broadcast_buffers(module: torch.nn.Module, job: Dist) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank, so that every shard is validated by the model
    rank 0 saves."""
    if not job.enabled:
        return
    import torch.distributed as dist

    for buf in module.buffers():
        _collective(job, dist.broadcast, buf, 0)


def _collective(job: Dist, op: Any, *args: Any) -> None:
    try:
        op(*args)
    except RuntimeError as e:  # gloo/nccl: a peer closed its connection (it failed or was killed), or a timeout
        raise peer_failed(job, e) from None


def peer_failed(job: Dist, error: BaseException, run_dir: Any = None) -> PeerFailed:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    first = first.split("This is typically caused")[0].strip()  # gloo's own advice, cut mid-sentence otherwise
    where = f" in {run_dir}" if run_dir is not None else " in the run directory"
    return PeerFailed(f"{job.label}: lost contact with the other processes of the job ({first[:200]}). Another process "
                      "failed or was stopped: its own message (above, or in its node's log) says why. Every completed epoch "
                      f"is saved{where}; continue with `fcclass train --resume {run_dir or 'RUN_DIR'}` under the same "
                      "torchrun command (or with --nproc-per-node).", error)


def is_peer_error(error: BaseException) -> bool:
    """Whether an exception raised inside DDP's backward or a collective comes from the process group."""
    import torch.distributed as dist

    text = str(error).lower()
    return isinstance(error, dist.DistError) or any(w in text for w in ("gloo", "nccl", "connection", "process group", "peer"))


def check_launch(nproc: int, cfg: Any, oversubscribe: bool) -> None:
    """Before ``--nproc-per-node`` starts anything: no more processes than cores (unless ``oversubscribe``) or GPUs,
    and their memory planned: each process's Python and torch, plus its model (its part of the batch) when on CPUs."""
    from fcclass.memory import check_processes, cores, model_bytes, network_sizes

    gpus = cfg is not None and cfg.train.device != "cpu" and torch.cuda.is_available()
    if gpus and nproc > torch.cuda.device_count():
        raise FcclassError(f"--nproc-per-node {nproc}: this machine has {torch.cuda.device_count()} GPU(s); use one process per GPU.")
    if nproc > cores() and not oversubscribe:
        raise FcclassError(f"--nproc-per-node {nproc} is more processes than this machine's {cores()} CPU core(s): they would "
                           f"only take turns. Use --nproc-per-node {cores()} or fewer, or add --oversubscribe to start them anyway.")
    model = 0
    if cfg is not None and not gpus:
        from fcclass.config.registries import DATASETS, TorchvisionSet
        from fcclass.data import describe
        from fcclass.model.network import build_model

        try:  # the in-memory datasets' shapes are known without reading them (as in training.setup.check_fits_early)
            if not isinstance(DATASETS[cfg.data.dataset], TorchvisionSet):
                raise KeyError(cfg.data.dataset)
            shape, classes = describe(cfg.data)
            params, total, _ = network_sizes(build_model(cfg.model, list(shape), classes, device="meta"))
            model = model_bytes(params, total, -(-cfg.data.batch_size // nproc), training=True)
        except (FcclassError, KeyError):  # the processes report it themselves
            pass
    check_processes(nproc, model, "Use fewer processes (--nproc-per-node), a smaller model or data.batch_size.")


def launch(nproc: int, fcclass_args: Sequence[str]) -> None:
    """``fcclass train --nproc-per-node N``: torchrun's own launcher (its elastic agent and c10d rendezvous on a free
    local port) starting N processes of ``fcclass <args>`` on this machine. A process that fails takes the others down
    (torchrun stops them); the error names which ranks failed, whose own messages came before it."""
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:  # torchrun would set 1 and warn; share the cores instead
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    # `python -m fcclass` puts the current folder first on the processes' import path: a folder named fcclass there
    # (a clone, say) would be imported instead of this fcclass. Python 3.11+ leaves it out with PYTHONSAFEPATH.
    os.environ["PYTHONSAFEPATH"] = "1"
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # torchrun's agent logs (read when its modules load) repeat our messages
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    for name in list(logging.root.manager.loggerDict):  # loggers torch made before LOGLEVEL was read
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "fcclass", *fcclass_args])
    os.environ[LAUNCH_COMMAND] = command_line()  # the run record's command: this one, as typed, not the processes' own
    try:
        run(args)
    except SignalException:  # Ctrl-C or SIGTERM: the processes got it too and stopped after saving
        raise KeyboardInterrupt from None
    except ChildFailedError as e:
        codes = {rank: failure.exitcode for rank, failure in e.failures.items()}
        if codes and all(code in (130, -2, -15) for code in codes.values()):
            raise KeyboardInterrupt from None
        raise FcclassError(f"Distributed training failed: {'; '.join(_fate(r, c) for r, c in sorted(codes.items()))}. The "
                           "processes' own messages are above; completed epochs are kept in the run directory.") from None
    finally:
        os.environ.pop(LAUNCH_COMMAND, None)


def _fate(rank: int, code: int) -> str:
    import signal

    if code == -signal.SIGTERM:
        return f"rank {rank} was stopped by torchrun"
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        return f"rank {rank} was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"rank {rank} exited with code {code}"


NODE_LOCAL_KEYS = ("data.root", "data.path", "data.cache_dir", "data.num_workers", "train.threads", "train.runs_dir", "train.device")


def check_same_config(job: Dist, config: dict[str, Any]) -> None:
    """Every process must train the same config (the data, the model, the optimisation): a machine started with
    another one would fail later in a collective with a low-level error, or worse, train something else. Keys that
    are each machine's own (where its data and runs are, its threads) may differ."""
    if not job.enabled:
        return
    import torch.distributed as dist

    from fcclass.config.load import flatten

    mine = {k: v for k, v in flatten(config).items() if k not in NODE_LOCAL_KEYS}
    every: list[Any] = [None] * job.world
    _collective(job, dist.all_gather_object, every, mine)
    for rank, theirs in enumerate(every):
        if theirs != every[0]:
            keys = sorted(k for k in set(theirs) | set(every[0]) if theirs.get(k) != every[0].get(k))
            shown = "; ".join(f"{k}: {every[0].get(k)!r} on rank 0, {theirs.get(k)!r} on rank {rank}" for k in keys[:5])
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            raise FcclassError(f"The processes of this job were started with different configs ({shown}{more}). Start every "
                               "machine with the same config and --set options (only where data and runs live may differ).")
