"""``b2t-train`` for one process of a torchrun job.

    python -m torch.distributed.run --nproc_per_node 2 -m b2t_tools.commands.torchrun_train DATA ARGS...
    torchrun --nproc_per_node 2 --no-python b2t-torchrun-train DATA ARGS...          (the same)

torchrun starts one process per worker and passes its rank in the environment; fairseq wants it
as ``--distributed-rank`` (without it fairseq computes the rank modulo the number of GPUs, which
divides by zero on a CPU machine). This module adds the flags that torchrun's environment implies
and, on a machine without CUDA, the ones that CPU training needs (gloo, legacy_ddp: PyTorch's DDP
on CPU refuses the device_ids fairseq passes). Flags given on the command line win.

If a worker dies, torchrun stops the others and exits non-zero (within a few seconds, see
tests/e2e/test_torchrun_train.py). A worker that hangs instead (stopped, deadlocked, a lost
node) is not noticed by torchrun, and the others wait in their next collective for the process
group's timeout (torch's default: 30 minutes). fairseq's ``--heartbeat-timeout SECONDS`` only
sends SIGINT, which a process blocked inside a gloo collective never sees; so this launcher also
makes it the process group's timeout: the blocked collective then fails after that many seconds
and torchrun ends the job.
"""

import os
import sys

from b2t_fairseq.patches import collective_timeout

from ..errors import ToolError
from ..util import has_flag as _has
from ..util import wants_help
from . import cli, run_command


def torchrun_argv(argv, env=os.environ, cuda=None):
    """argv plus the distributed flags for this process, from torchrun's RANK/WORLD_SIZE/LOCAL_RANK."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise ToolError(f"{', '.join(missing)} not set; start this command under torchrun "
                       "(torchrun --nproc_per_node N --no-python b2t-torchrun-train DATA ...)")
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


def _heartbeat(args):
    """--heartbeat-timeout (as parsed) becomes the process groups' timeout too."""
    if getattr(args, "heartbeat_timeout", -1) > 0:
        collective_timeout.install(float(args.heartbeat_timeout))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):  # the help needs no torchrun
        return cli.run_fairseq(_train_main, argv, prog="b2t-torchrun-train")
    return run_command("b2t-torchrun-train",
                       lambda: cli.run_fairseq(_train_main, torchrun_argv(argv), prog="b2t-train", setup=_heartbeat))


def _train_main():
    from fairseq_cli.train import cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
