"""The `accelerate.Accelerator` both training stages run on, checked against how the script was launched.

accelerate puts processes on a host without a GPU into one (gloo) process group only when told to use the CPU;
otherwise each process of `accelerate launch --multi_gpu --num_processes N` would train alone. So when several
processes are launched and no GPU is present, the CPU is asked for explicitly, and a launch that accelerate still
does not see as one group is an error rather than N silent copies of the run. Without --multi_gpu, accelerate starts
a single process on such a host whatever --num_processes says: that is an error too.
"""

from __future__ import annotations

import logging
import os

import torch

from ..errors import ConfigError

logger = logging.getLogger(__name__)


def requested_processes() -> int | None:
    """How many processes the `accelerate launch` that started this one asked for (its --num_processes), read
    from the launcher's command line (Linux /proc); None when unknown or not launched by accelerate."""
    if "ACCELERATE_MIXED_PRECISION" not in os.environ:  # set by `accelerate launch` for its processes
        return None
    try:
        args = open(f"/proc/{os.getppid()}/cmdline", "rb").read().decode().split("\0")
    except OSError:
        return None
    for i, arg in enumerate(args):
        if arg == "--num_processes" and i + 1 < len(args) and args[i + 1].isdigit():
            return int(args[i + 1])
        if arg.startswith("--num_processes=") and arg.split("=", 1)[1].isdigit():
            return int(arg.split("=", 1)[1])
    return None


def _on_cpu_group() -> tuple[int, bool]:
    """(processes launched, whether accelerate must be told to use the CPU to put them in one gloo group)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    requested = requested_processes()
    if launched == 1 and requested and requested > 1 and not torch.cuda.is_available():
        raise ConfigError(f"`accelerate launch --num_processes {requested}` started one process: on a host without a "
                         f"GPU accelerate needs --multi_gpu to start {requested} CPU processes in one gloo group "
                         f"(`accelerate launch --multi_gpu --num_processes {requested} ...`).")
    return launched, launched > 1 and not torch.cuda.is_available()


def _check(state, launched: int):
    if state.num_processes != launched:
        raise RuntimeError(f"{launched} processes were launched but accelerate sees {state.num_processes} "
                           f"({state.distributed_type}); check your accelerate config.")
    if state.is_main_process:
        logger.info("%d process(es), %s, device %s", state.num_processes, state.distributed_type.value, state.device)
    return state


def make_accelerator(**kwargs):
    """`Accelerator(**kwargs)`, on the CPU process group when several processes run on a host without a GPU."""
    from accelerate import Accelerator

    launched, cpu = _on_cpu_group()
    if cpu:
        kwargs.setdefault("cpu", True)
    return _check(Accelerator(**kwargs), launched)


def process_state():
    """accelerate's `PartialState` (processes, devices, barriers; nothing to prepare), on the same process group
    as `make_accelerator`: for work split over processes without training, such as the feature cache."""
    from accelerate import PartialState

    launched, cpu = _on_cpu_group()
    return _check(PartialState(cpu=cpu), launched)
