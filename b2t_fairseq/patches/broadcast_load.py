"""Repair: a run on more than one worker resumes under torch >= 2.6.

fairseq's trainer reads a checkpoint on rank 0 and sends it to the other ranks with
``distributed_utils.broadcast_object``; the receivers unpickle it with ``torch.load``, whose
weights-only default (torch >= 2.6) refuses the run's ``DictConfig`` in it, so every rank but 0
fails on resume. Those bytes were pickled a moment ago by rank 0 of the same job, from a
checkpoint rank 0 has already loaded, so the receivers load them as torch < 2.6 did.
Relies on: ``fairseq.distributed.utils._broadcast_object_slow(obj, src_rank, group, dist_device)``,
looked up as a module global by ``broadcast_object``; ``get_rank(group)``, ``broadcast(tensor, src, group)``.
"""

import functools
import inspect
import io

import torch


def install():
    from fairseq.distributed import utils as distributed_utils

    slow = distributed_utils._broadcast_object_slow
    if getattr(slow, "b2t_trusted_receive", False):
        return
    if "weights_only" not in inspect.signature(torch.load).parameters:  # torch < 1.13: nothing to repair
        return

    @functools.wraps(slow)
    def broadcast_object_slow(obj, src_rank, group, dist_device):
        if distributed_utils.get_rank(group) == src_rank:
            return slow(obj, src_rank, group, dist_device)
        # the receiving half of fairseq's function, with the load that torch < 2.6 made
        length = torch.LongTensor([0]).to(dist_device)
        distributed_utils.broadcast(length, src=src_rank, group=group)
        buffer = torch.ByteTensor(int(length.item())).to(dist_device)
        distributed_utils.broadcast(buffer, src=src_rank, group=group)
        return torch.load(io.BytesIO(buffer.cpu().numpy()), map_location="cpu", weights_only=False)

    broadcast_object_slow.b2t_trusted_receive = True
    distributed_utils._broadcast_object_slow = broadcast_object_slow
