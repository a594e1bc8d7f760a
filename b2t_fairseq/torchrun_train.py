"""``b2t-train`` for one process of a torchrun job.

    python -m torch.distributed.run --nproc_per_node 2 -m b2t_fairseq.torchrun_train DATA ARGS...

torchrun starts one process per worker and passes its rank in the environment; fairseq wants it
as ``--distributed-rank`` (without it fairseq computes the rank modulo the number of GPUs, which
divides by zero on a CPU machine). This module adds the flags that torchrun's environment implies
and, on a machine without CUDA, the ones that CPU training needs (gloo, legacy_ddp: PyTorch's DDP
on CPU refuses the device_ids fairseq passes). Flags given on the command line win.

If a worker dies, torchrun stops the others and exits non-zero (within a few seconds, see
tests/test_reliability_distributed.py). A worker that hangs instead (stopped, deadlocked, a lost
node) is not noticed by torchrun, and the others wait in their next collective for the process
group's timeout (torch's default: 30 minutes). fairseq's ``--heartbeat-timeout SECONDS`` only
sends SIGINT, which a process blocked inside a gloo collective never sees; so this launcher also
makes it the process group's timeout: the blocked collective then fails after that many seconds
and torchrun ends the job.
"""

import datetime

import os
import sys

from . import cli
from .errors import flag_value


def _has(argv, flag):
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def torchrun_argv(argv, env=os.environ, cuda=None):
    """argv plus the distributed flags for this process, from torchrun's RANK/WORLD_SIZE/LOCAL_RANK."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise SystemExit(f"b2t-torchrun-train: error: {', '.join(missing)} not set; start this module with "
                         "torchrun (python -m torch.distributed.run --nproc_per_node N -m b2t_fairseq.torchrun_train ...)")
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available() and not _has(argv, "--cpu")
    extra = {
        "--distributed-world-size": env["WORLD_SIZE"],
        "--distributed-rank": env["RANK"],
        "--distributed-init-method": "env://",
        "--device-id": env.get("LOCAL_RANK", "0"),
    }
    if not cuda:
        extra["--distributed-backend"] = "gloo"
        extra["--ddp-backend"] = "legacy_ddp"
    out = list(argv)
    for flag, value in extra.items():
        if not _has(out, flag):
            out += [flag, value]
    if not _has(out, "--distributed-no-spawn"):
        out.append("--distributed-no-spawn")
    return out


def collective_timeout(seconds):
    """Make the process groups of this process (fairseq's default one and the data-parallel group
    it creates with new_group) time out after this many seconds instead of torch's default."""
    import torch.distributed as dist

    def with_timeout(make):
        def make_group(*args, **kwargs):
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = datetime.timedelta(seconds=seconds)
            return make(*args, **kwargs)
        return make_group

    dist.init_process_group = with_timeout(dist.init_process_group)
    dist.new_group = with_timeout(dist.new_group)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    heartbeat = flag_value(argv, "--heartbeat-timeout")
    if heartbeat is not None and float(heartbeat) > 0:
        collective_timeout(float(heartbeat))
    return cli.run_fairseq(_train_main, torchrun_argv(argv), prog="b2t-train")


def _train_main():
    from fairseq_cli.train import cli_main

    return cli_main()


if __name__ == "__main__":
    main()
