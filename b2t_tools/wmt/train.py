"""Build (and run) the paper's WMT En-De training command for one GPU, many GPUs, many nodes or CPU procs.

``scripts/train.sh ARCH LAYERS [options] [-- extra fairseq flags]`` calls this module. It keeps the
authors' 458,752 target tokens per update whatever the hardware: ``--update-freq`` is
``tokens_per_update / (world_size * max_tokens)`` and a setup where that is not a whole number is
refused. Launch modes:

- ``spawn`` (one node): ``b2t-train ... --distributed-world-size G``; fairseq starts one process per GPU.
- ``torchrun`` (one or many nodes): ``torchrun --nnodes N --nproc_per_node G --node_rank R ...``, run once on
  every node; fairseq reads RANK/LOCAL_RANK/WORLD_SIZE from the environment.
- ``slurm`` (inside an sbatch allocation): ``srun --ntasks-per-node G b2t-train ... --distributed-port P``;
  fairseq reads SLURM_PROCID/SLURM_LOCALID and the node list.
- CPU: one process, or ``--cpu-procs P`` gloo processes under torchrun (the flags b2t_tools/commands/torchrun_train.py adds).

The save folder gets ``train.log`` (json lines), optional ``tb/`` (tensorboard) and, when training ends
with status 0, ``DONE``; a folder with ``DONE`` is not trained into again without ``--force``. An
interrupted run resumes from ``checkpoint_last.pt`` (fairseq's own resume).
"""

import argparse
import os
import shlex
import shutil
import subprocess
import sys

from b2t_fairseq import layer_types, recipe

from ..commands import run_command
from ..errors import ToolError
from ..util import atomic_write, check_writable, split_at_dashes

TOKENS_PER_UPDATE = recipe.TOKENS_PER_UPDATE

ARCH_FAMILIES = tuple(t.family for t in layer_types.LAYER_TYPES)
DEFAULT_DATA = "data-bin/wmt16_en_de_bpe32k"


def hyperparameters(layers):
    """The authors' 2023 command (their README), without the removed --min-lr, as (flag, value) pairs."""
    return recipe.wmt_flags(layers)


def resolve_arch(arch, layers):
    """ARCH LAYERS -> (fairseq --arch, extra layer flags). 6 and 18 are named architectures."""
    if arch not in ARCH_FAMILIES:
        raise ToolError(f"unknown ARCH '{arch}'; choose one of {', '.join(ARCH_FAMILIES)}")
    if layers < 1:
        raise ToolError(f"LAYERS {layers} is not a number of layers; pass a positive number of layers per stack (the paper: 6 or 18)")
    name = arch + ("_18l" if layers >= 18 else "")
    extra = [] if layers in (6, 18) else [("--encoder-layers", str(layers)), ("--decoder-layers", str(layers))]
    return name, extra


def update_freq(tokens_per_update, world, max_tokens):
    if tokens_per_update < 1 or world < 1 or max_tokens < 1:  # check_numbers refuses these first
        raise ToolError(f"cannot split {tokens_per_update} tokens per update into {world} process(es) x --max-tokens "
                       f"{max_tokens}; all three must be positive")
    step = world * max_tokens
    if tokens_per_update % step:
        hint = _max_tokens_hint(tokens_per_update, world, max_tokens)
        raise ToolError(f"{tokens_per_update} tokens per update cannot be split into {world} process(es) x "
                       f"--max-tokens {max_tokens} (= {step} tokens a step, ratio {tokens_per_update / step:.3g}); "
                       f"{hint}")
    return tokens_per_update // step


def _max_tokens_hint(tokens_per_update, world, max_tokens):
    if tokens_per_update % world:
        return (f"no --max-tokens fits {world} processes: use a number of GPUs x nodes that divides "
                f"{tokens_per_update}, or change --tokens-per-update")
    per_proc = tokens_per_update // world
    fits = [m for m in range(min(max_tokens, per_proc), 0, -1) if per_proc % m == 0]
    return f"use --max-tokens {fits[0]} (the largest value <= {max_tokens} that divides evenly)"


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


def parse_args(argv):
    argv, extra = split_at_dashes(argv)
    p = argparse.ArgumentParser(prog="train.sh", description=__doc__.split("\n\n")[0],
                                epilog="Everything after -- is passed to fairseq unchanged (and wins over "
                                       "the recipe's flags).")
    p.add_argument("arch", metavar="ARCH", help=" | ".join(ARCH_FAMILIES))
    p.add_argument("layers", metavar="LAYERS", type=int, help="layers per stack: 6 or 18 (the paper), or any")
    p.add_argument("--gpus", type=int, help="GPUs per node (default: all visible; 0 = CPU)")
    p.add_argument("--nodes", type=int, default=None, help="number of nodes (default 1, or SLURM_NNODES)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank (torchrun launcher)")
    p.add_argument("--master-addr", default="127.0.0.1", help="rank 0 host (torchrun, several nodes)")
    p.add_argument("--master-port", type=int, default=29500, help="rendezvous port (torchrun; SLURM: fairseq's port)")
    p.add_argument("--launcher", choices=("auto", "spawn", "torchrun", "slurm"), default="auto",
                   help="auto: spawn on one node, torchrun on several")
    p.add_argument("--cpu-procs", type=int, default=1, help="with no GPU: this many gloo processes (torchrun)")
    p.add_argument("--max-tokens", type=int, default=recipe.MAX_TOKENS)
    p.add_argument("--tokens-per-update", type=int, default=TOKENS_PER_UPDATE,
                   help=f"target tokens per update (default {TOKENS_PER_UPDATE:,} = 3584 x 8 GPUs x 16)")
    p.add_argument("--data", default=os.environ.get("B2T_WMT_DATA", DEFAULT_DATA), help="binarized data")
    p.add_argument("--save-dir", help="default checkpoints/wmt16_en_de/ARCH_LAYERSl")
    p.add_argument("--tensorboard", action="store_true", help="also write tensorboard logs to SAVE_DIR/tb")
    p.add_argument("--no-fp16", action="store_true", help="train in fp32 on GPUs")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    p.add_argument("--force", action="store_true", help="delete a finished run in SAVE_DIR and train again")
    args = p.parse_args(argv)
    args.extra = extra
    return args


def check_numbers(args):
    """One line for every impossible number, before anything is computed from it (no --update-freq 0 or
    negative is ever printed)."""
    if args.layers < 1:
        raise ToolError(f"LAYERS {args.layers} is not a number of layers; pass a positive number of layers per stack "
                       "(the paper: 6 or 18)")
    if args.layers > 1000:  # DeepNorm's deepest model has 1000 layers in all; more is a typo that would exhaust memory
        raise ToolError(f"LAYERS {args.layers} is more layers per stack than any model trained (DeepNorm: 1000 in "
                        "all); pass at most 1000 (the paper: 6 or 18)")
    if args.max_tokens < 1:
        raise ToolError(f"--max-tokens {args.max_tokens} is not a positive number of tokens; pass the tokens per GPU batch, "
                       f"e.g. --max-tokens {recipe.MAX_TOKENS} (the paper's)")
    if args.tokens_per_update < 1:
        raise ToolError(f"--tokens-per-update {args.tokens_per_update} is not a positive number of tokens; pass e.g. "
                       f"--tokens-per-update {TOKENS_PER_UPDATE} (the paper's)")
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


def world_layout(args):
    """(gpus per node, nodes, processes in all, launcher)."""
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
        raise ToolError(f"--node-rank {args.node_rank} does not exist with --nodes {nodes}; pass 0 to {nodes - 1} (ranks count from 0)")
    if gpus == 0:
        if nodes > 1 or args.launcher == "slurm":
            raise ToolError("several nodes or SLURM need GPUs: pass --gpus N (CPU runs use --cpu-procs on one node)")
        return 0, 1, args.cpu_procs, "torchrun" if args.cpu_procs > 1 else "spawn"
    launcher = args.launcher
    if launcher == "auto":
        launcher = "torchrun" if nodes > 1 else "spawn"
    if launcher == "spawn" and nodes > 1:
        raise ToolError("--launcher spawn runs on one node; use --launcher torchrun or slurm for --nodes > 1")
    return gpus, nodes, gpus * nodes, launcher


def fairseq_flags(args, world):
    arch, layer_flags = resolve_arch(args.arch, args.layers)
    uf = update_freq(args.tokens_per_update, world, args.max_tokens)
    flags = [("--arch", arch)] + layer_flags + hyperparameters(args.layers)
    flags += [("--max-tokens", str(args.max_tokens)), ("--update-freq", str(uf))]
    return flags


def save_dir_of(args):
    return args.save_dir or os.path.join("checkpoints", "wmt16_en_de", f"{args.arch}_{args.layers}l")


def build_command(args):
    """The full command line (a list) that this launch runs."""
    gpus, nodes, world, launcher = world_layout(args)
    save = save_dir_of(args)
    flags = fairseq_flags(args, world)
    flags += [("--save-dir", save), ("--log-format", "json"), ("--log-interval", "100"),
              ("--log-file", os.path.join(save, "train.log"))]
    if args.tensorboard:
        flags.append(("--tensorboard-logdir", os.path.join(save, "tb")))
    if gpus == 0:
        flags.append(("--cpu", None))
    elif not args.no_fp16:
        flags.append(("--fp16", None))
    if world > 1:
        flags.append(("--distributed-world-size", str(world)))
    if gpus == 0 and world > 1:  # what gloo needs under torchrun (commands/torchrun_train.py)
        flags += [("--distributed-init-method", "env://"), ("--distributed-no-spawn", None),
                  ("--distributed-backend", "gloo"), ("--ddp-backend", "legacy_ddp")]
    if launcher == "slurm":
        flags.append(("--distributed-port", str(args.master_port)))
    fairseq_args = [args.data] + [x for f, v in flags for x in ((f,) if v is None else (f, v))] + args.extra
    bindir = os.path.dirname(sys.executable)
    if launcher == "spawn":
        return [os.path.join(bindir, "b2t-train")] + fairseq_args
    if launcher == "slurm":
        return ["srun", "--nodes", str(nodes), "--ntasks-per-node", str(gpus), "--gpus-per-node", str(gpus),
                os.path.join(bindir, "b2t-train")] + fairseq_args
    procs = gpus or world
    if nodes == 1:
        rdzv = ["--standalone"]
    else:
        rdzv = ["--nnodes", str(nodes), "--node_rank", str(args.node_rank),
                "--master_addr", args.master_addr, "--master_port", str(args.master_port)]
    return [sys.executable, "-m", "torch.distributed.run"] + rdzv + ["--nproc_per_node", str(procs),
            "-m", "b2t_tools.commands.torchrun_train"] + fairseq_args


def check_data(data):
    if not os.path.isdir(data):
        what = "is a file, not a folder" if os.path.exists(data) else "does not exist"
        raise ToolError(f"--data {data} {what}; run scripts/prepare-wmt16-en-de.sh first or pass --data DIR (the "
                       "folder it wrote)")
    missing = [f for f in ("dict.en.txt", "dict.de.txt", "train.en-de.en.bin") if not os.path.exists(os.path.join(data, f))]
    if missing:
        raise ToolError(f"--data {data} is not a binarized WMT folder (missing {', '.join(missing)}); run "
                       "scripts/prepare-wmt16-en-de.sh first or pass --data DIR")


def prepare_save_dir(save, force):
    if os.path.exists(save) and not os.path.isdir(save):
        raise ToolError(f"--save-dir {save} is a file, not a folder; choose another --save-dir")
    done = os.path.join(save, "DONE")
    if os.path.exists(done):
        if not force:
            raise ToolError(f"{save} holds a finished run ({done} exists); pass --force to delete it and train "
                           "again, or choose another --save-dir")
        shutil.rmtree(save)
    check_writable(os.path.join(save, "train.log"), "--save-dir")  # folder missing, under a file, read-only


def run(argv):
    args = parse_args(argv)
    cmd = build_command(args)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    check_data(args.data)
    save = save_dir_of(args)
    prepare_save_dir(save, args.force)
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    rc = subprocess.call(cmd)
    if rc == 0:
        atomic_write(os.path.join(save, "DONE"), shlex.join(cmd) + "\n")
    return rc


def main(argv=None):
    return run_command("train.sh", run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
