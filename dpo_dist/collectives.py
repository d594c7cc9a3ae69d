"""Object collectives over the run's processes: work done once and shared, lists joined in rank order.

Plain `torch.distributed` calls on an accelerate `Accelerator`'s process group; with one process
they cost nothing.
"""

from __future__ import annotations

import torch

from dpo_dist.errors import UserError


def on_main_broadcast(accelerator, compute):
    """`compute()` on the main process only, its result sent to every rank: expensive work (hashing
    gigabytes) done once, not once per rank. A UserError there is raised on every rank; any other
    error keeps its type on the main process and stops the others with a line saying so (none is
    left waiting for a broadcast that never comes)."""
    result, error, failure = None, None, None
    if accelerator.is_main_process:
        try:
            result = compute()
        except UserError as err:
            error = str(err)
        except BaseException as err:  # (Ctrl-C too) re-raised below, after the other ranks have heard of it
            failure = err
            error = f"stopped: the main process failed ({type(err).__name__}: {err})"
    if accelerator.num_processes > 1:
        # torch's own: accelerate's wrapper skips the broadcast for some CPU setups (MULTI_GPU yaml, gloo).
        box = [result, error]
        torch.distributed.broadcast_object_list(box, src=0)
        result, error = box
    if failure is not None:
        raise failure
    if error is not None:
        raise UserError(error)
    return result


def all_gather_objects(accelerator, items: list) -> list:
    """Every rank's `items`, concatenated in rank order, on every rank."""
    if accelerator.num_processes == 1:
        return list(items)
    per_rank = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(per_rank, list(items))
    return [item for rank_items in per_rank for item in rank_items]


def on_main_with_tensor_verdict(accelerator, work) -> None:
    """`work()` on the main process once the training engine exists; the other ranks learn whether
    it failed through one tensor all-reduce (the collective every training step already makes; an
    object broadcast after DeepSpeed's bf16 set-up was seen to abort a rank at exit on the CPU).
    The main process raises its own error; the others a UserError pointing at it."""
    failure = None
    if accelerator.is_main_process:
        try:
            work()
        except BaseException as err:  # (Ctrl-C too) raised below, after the other ranks have heard of it
            failure = err
    if accelerator.num_processes > 1:
        flag = torch.tensor([float(failure is not None)], device=accelerator.device)
        failed = accelerator.reduce(flag, reduction="sum").item() > 0
        if failed and failure is None:
            raise UserError("stopped: the main process failed (its line above says why)")
    if failure is not None:
        raise failure
