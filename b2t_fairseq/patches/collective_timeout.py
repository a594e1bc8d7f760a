"""Not applied on import: the torchrun launcher (b2t-torchrun-train --heartbeat-timeout) installs it.

A worker blocked in a gloo collective never sees the SIGINT fairseq's heartbeat sends, so the process
groups of this process (fairseq's default one and the data-parallel group it creates with new_group)
time out after that many seconds instead of torch's default 30 minutes.
Relies on: ``torch.distributed.init_process_group`` and ``new_group`` taking ``timeout=``.
"""

import datetime


def install(seconds):
    import torch.distributed as dist

    def with_timeout(make):
        if getattr(make, "b2t_timeout", None) is not None:
            make = make.b2t_original

        def make_group(*args, **kwargs):
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = datetime.timedelta(seconds=seconds)
            return make(*args, **kwargs)
        make_group.b2t_timeout, make_group.b2t_original = seconds, make
        return make_group

    dist.init_process_group = with_timeout(dist.init_process_group)
    dist.new_group = with_timeout(dist.new_group)
