"""How a recipe's ``b2t-train`` command is launched on one GPU, many GPUs, many nodes or CPU processes.

Shared by ``scripts/train.sh`` (``b2t_tools/wmt/train.py``) and ``b2t-lm-train`` (``b2t_tools/lm/train.py``):
the launch flags, the world layout, the ``--update-freq`` that keeps a recipe's tokens per update, and the
command for each launcher:

- ``spawn`` (one node): ``b2t-train ... --distributed-world-size G``; fairseq starts one process per GPU.
- ``torchrun`` (one or many nodes): ``torchrun --nnodes N --nproc_per_node G --node_rank R ...``, run once on
  every node; fairseq reads RANK/LOCAL_RANK/WORLD_SIZE from the environment.
- ``slurm`` (inside an sbatch allocation): ``srun --ntasks-per-node G b2t-train ... --distributed-port P``;
  fairseq reads SLURM_PROCID/SLURM_LOCALID and the node list.
- CPU: one process, or ``--cpu-procs P`` gloo processes under torchrun (the flags
  b2t_tools/commands/torchrun_train.py adds).

Imports neither torch nor fairseq: the Hydra configs' update_freq resolver (hydra_configs.py) uses it too.
"""

import os
import shutil
import subprocess
import sys
from collections import namedtuple

from .errors import ToolError

Layout = namedtuple("Layout", "gpus nodes world launcher")


def add_arguments(p, max_tokens, tokens_per_update, what):
    """The launch flags, on parser p; max_tokens and tokens_per_update are the recipe's (what: how it got them)."""
    p.add_argument("--gpus", type=int, help="GPUs per node (default: all visible; 0 = CPU)")
    p.add_argument("--nodes", type=int, default=None, help="number of nodes (default 1, or SLURM_NNODES)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank (torchrun launcher)")
    p.add_argument("--master-addr", default="127.0.0.1", help="rank 0 host (torchrun, several nodes)")
    p.add_argument("--master-port", type=int, default=29500, help="rendezvous port (torchrun; SLURM: fairseq's port)")
    p.add_argument("--launcher", choices=("auto", "spawn", "torchrun", "slurm"), default="auto",
                   help="auto: spawn on one node, torchrun on several")
    p.add_argument("--cpu-procs", type=int, default=1, help="with no GPU: this many gloo processes (torchrun)")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens per GPU batch (default {max_tokens})")
    p.add_argument("--tokens-per-update", type=int, default=tokens_per_update,
                   help=f"target tokens per update (default {tokens_per_update:,} = {what})")
    p.set_defaults(recipe_max_tokens=max_tokens, recipe_tokens_per_update=tokens_per_update)


def check_numbers(args):
    """One line for every impossible launch number, before anything is computed from it (no --update-freq 0
    or negative is ever printed)."""
    if args.max_tokens < 1:
        raise ToolError(f"--max-tokens {args.max_tokens} is not a positive number of tokens; pass the tokens per GPU batch, "
                       f"e.g. --max-tokens {args.recipe_max_tokens} (the recipe's)")
    if args.tokens_per_update < 1:
        raise ToolError(f"--tokens-per-update {args.tokens_per_update} is not a positive number of tokens; pass e.g. "
                       f"--tokens-per-update {args.recipe_tokens_per_update} (the recipe's)")
    if args.gpus is not None and args.gpus < 0:
        raise ToolError(f"--gpus {args.gpus} is negative; pass the number of GPUs per node, or 0 for the CPU")
    if args.nodes is not None and args.nodes < 1:
        raise ToolError(f"--nodes {args.nodes} is not a number of nodes; pass 1 or more")
    if args.cpu_procs < 1:
        raise ToolError(f"--cpu-procs {args.cpu_procs} is not a number of processes; pass 1 or more")
    if not 1 <= args.master_port <= 65535:
        raise ToolError(f"--master-port {args.master_port} is not a TCP port; pass one in 1-65535 (default 29500)")
    if args.node_rank < 0:
        raise ToolError(f"--node-rank {args.node_rank} is negative; pass this node's rank, 0 for the first node")


def _set(flag, value):
    return f"{flag}{value}" if flag.endswith("=") else f"{flag} {value}"  # a Hydra key=, or a --flag


def update_freq(tokens_per_update, world, max_tokens, max_tokens_flag="--max-tokens",
                world_flags="GPUs x nodes", tokens_flag="--tokens-per-update"):
    """tokens_per_update / (world x max_tokens), refused in one line (with the fix) when it is not whole.
    The flag names are those of the command that asks (a launcher's, or a Hydra config's keys)."""
    if tokens_per_update < 1 or world < 1 or max_tokens < 1:  # check_numbers refuses these first
        raise ToolError(f"cannot split {tokens_per_update} tokens per update into {world} process(es) x "
                       f"{_set(max_tokens_flag, max_tokens)}; all three must be positive")
    step = world * max_tokens
    if tokens_per_update % step:
        if tokens_per_update % world:  # no per-process batch fits: the process count itself is the problem
            below = max(d for d in range(1, world) if tokens_per_update % d == 0)
            above = next((d for d in range(world + 1, min(tokens_per_update, 4 * world) + 1) if tokens_per_update % d == 0), None)
            near = f"{below} or {above}" if above else str(below)
            hint = (f"no {max_tokens_flag.rstrip('=')} fits {world} processes: use a number of {world_flags} that divides "
                    f"{tokens_per_update} (e.g. {near} processes), or change {tokens_flag}")
        else:
            per_proc = tokens_per_update // world
            fit = next(m for m in range(min(max_tokens, per_proc), 0, -1) if per_proc % m == 0)
            hint = f"use {_set(max_tokens_flag, fit)} (the largest value <= {max_tokens} that divides evenly)"
        raise ToolError(f"{tokens_per_update} tokens per update cannot be split into {world} process(es) x "
                       f"{_set(max_tokens_flag, max_tokens)} (= {step} tokens a step, ratio {tokens_per_update / step:.3g}); "
                       f"{hint}")
    return tokens_per_update // step


def visible_gpus():
    """CUDA_VISIBLE_DEVICES if set, else the lines of `nvidia-smi -L`, else 0."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return len([d for d in cvd.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def world_layout(args):
    """Layout(gpus per node, nodes, processes in all, launcher)."""
    check_numbers(args)
    gpus = visible_gpus() if args.gpus is None else args.gpus
    nodes = args.nodes
    if nodes is None:
        nodes = 1
        if args.launcher == "slurm":
            env = os.environ.get("SLURM_NNODES", "1")
            if not env.isdigit() or int(env) < 1:
                raise ToolError(f"SLURM_NNODES={env!r} is not a number of nodes; run inside an sbatch allocation or "
                               "pass --nodes N")
            nodes = int(env)
    if args.node_rank >= nodes:
        raise ToolError(f"--node-rank {args.node_rank} does not exist with --nodes {nodes}; pass 0 to {nodes - 1} "
                        "(ranks count from 0)")
    if gpus == 0:
        if nodes > 1 or args.launcher == "slurm":
            raise ToolError("several nodes or SLURM need GPUs: pass --gpus N (CPU runs use --cpu-procs on one node)")
        return Layout(0, 1, args.cpu_procs, "torchrun" if args.cpu_procs > 1 else "spawn")
    launcher = args.launcher
    if launcher == "auto":
        launcher = "torchrun" if nodes > 1 else "spawn"
    if launcher == "spawn" and nodes > 1:
        raise ToolError("--launcher spawn runs on one node; use --launcher torchrun or slurm for --nodes > 1")
    return Layout(gpus, nodes, gpus * nodes, launcher)


def device_flags(layout, args, fp16=True):
    """The fairseq flags the layout implies, as (flag, value or None) pairs: device, precision, world size."""
    flags = []
    if layout.gpus == 0:
        flags.append(("--cpu", None))
    elif fp16:
        flags.append(("--fp16", None))
    if layout.world > 1:
        flags.append(("--distributed-world-size", str(layout.world)))
    if layout.gpus == 0 and layout.world > 1:  # what gloo needs under torchrun (commands/torchrun_train.py)
        flags += [("--distributed-init-method", "env://"), ("--distributed-no-spawn", None),
                  ("--distributed-backend", "gloo"), ("--ddp-backend", "legacy_ddp")]
    if layout.launcher == "slurm":
        flags.append(("--distributed-port", str(args.master_port)))
    return flags


def flags_to_argv(flags):
    return [x for f, v in flags for x in ((f,) if v is None else (f, v))]


def command(layout, args, fairseq_args):
    """The full command line (a list) that runs ``b2t-train FAIRSEQ_ARGS`` under the layout's launcher."""
    bindir = os.path.dirname(sys.executable)
    if layout.launcher == "spawn":
        return [os.path.join(bindir, "b2t-train")] + fairseq_args
    if layout.launcher == "slurm":
        return ["srun", "--nodes", str(layout.nodes), "--ntasks-per-node", str(layout.gpus), "--gpus-per-node",
                str(layout.gpus), os.path.join(bindir, "b2t-train")] + fairseq_args
    procs = layout.gpus or layout.world
    if layout.nodes == 1:
        rdzv = ["--standalone"]
    else:
        rdzv = ["--nnodes", str(layout.nodes), "--node_rank", str(args.node_rank),
                "--master_addr", args.master_addr, "--master_port", str(args.master_port)]
    return [sys.executable, "-m", "torch.distributed.run"] + rdzv + ["--nproc_per_node", str(procs),
            "-m", "b2t_tools.commands.torchrun_train"] + fairseq_args
