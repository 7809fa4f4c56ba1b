"""The `accelerate.Accelerator` both training stages run on, checked against how the script was launched.

accelerate puts processes on a host without a GPU into one (gloo) process group only when told to use the CPU;
otherwise each process of `accelerate launch --multi_gpu --num_processes N` would train alone. So when several
processes are launched and no GPU is present, the CPU is asked for explicitly, and a launch that accelerate still
does not see as one group is an error rather than N silent copies of the run.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def make_accelerator(**kwargs):
    """`Accelerator(**kwargs)`, on the CPU process group when several processes run on a host without a GPU."""
    from accelerate import Accelerator

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and not torch.cuda.is_available():
        kwargs.setdefault("cpu", True)
    accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != launched:
        raise RuntimeError(f"{launched} processes were launched but accelerate sees {accelerator.num_processes} "
                           f"({accelerator.distributed_type}); check your accelerate config.")
    if accelerator.is_main_process:
        logger.info("%d process(es), %s, device %s", accelerator.num_processes,
                    accelerator.distributed_type.value, accelerator.device)
    return accelerator
