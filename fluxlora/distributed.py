"""Data-parallel training through accelerate (``accelerate launch --multi_gpu`` on GPUs, ``torchrun`` on
CPUs with the gloo backend).

How the processes stay identical to one process with the same global batch:
- every process draws the whole global micro-batch (rows, flips, sigmas, noise) from the same seeded CPU
  generator, then computes the loss only on its own equal share of the rows;
- after the backward passes the gradients of the trainable tensors are averaged over the processes,
  so every process applies the same update (the mean of the shares' mean losses = the global mean);
- only the main process writes the run folder; a checkpoint therefore resumes every process.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def make_accelerator(mixed_precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state; a second run in the same process (tests, the web UI)
    # may ask for another precision, so start from a clean state (accelerate 1.15 API).
    AcceleratorState._reset_state(reset_partial_state=True)
    # Without a GPU accelerate only forms a process group (gloo) when told it runs on CPUs.
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def on_main(accelerator, fn: Callable[[], T], error_type: type[Exception]) -> T | None:
    """Run ``fn`` on the main process only. The other processes wait for it; if it raised
    ``error_type`` they raise the same message, so no process is left waiting on the others."""
    if accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    result, box = None, [None]
    if accelerator.is_main_process:
        try:
            result = fn()
        except error_type as e:
            box = [str(e)]
            broadcast_object_list(box)
            raise
    broadcast_object_list(box)
    if box[0] is not None:
        raise error_type(box[0])
    return result


def share(n_instance: int, n_total: int, rank: int, world: int) -> torch.Tensor:
    """Row indices of this process's share of a global micro-batch laid out as [instance | prior]."""
    n_prior = n_total - n_instance
    per_i, per_p = n_instance // world, n_prior // world
    return torch.cat([torch.arange(rank * per_i, (rank + 1) * per_i),
                      n_instance + torch.arange(rank * per_p, (rank + 1) * per_p)])


def average_gradients(params: list[torch.Tensor], world: int) -> None:
    """All-reduce (mean) the gradients of ``params`` in one flat buffer."""
    if world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()


def mean_over_processes(value: float, device: torch.device, world: int) -> float:
    if world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world
