"""Build (and run) the paper's WMT En-De training command for one GPU, many GPUs, many nodes or CPU procs.

``scripts/train.sh ARCH LAYERS [options] [-- extra fairseq flags]`` calls this module. It keeps the
authors' 458,752 target tokens per update whatever the hardware: ``--update-freq`` is
``tokens_per_update / (world_size * max_tokens)`` and a setup where that is not a whole number is
refused. The launchers (spawn, torchrun, slurm, CPU processes) are b2t_tools/launch.py's, shared with
``b2t-lm-train``.

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

from .. import launch
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


def parse_args(argv):
    argv, extra = split_at_dashes(argv)
    p = argparse.ArgumentParser(prog="train.sh", description=__doc__.split("\n\n")[0],
                                epilog="Everything after -- is passed to fairseq unchanged (and wins over "
                                       "the recipe's flags).")
    p.add_argument("arch", metavar="ARCH", help=" | ".join(ARCH_FAMILIES))
    p.add_argument("layers", metavar="LAYERS", type=int, help="layers per stack: 6 or 18 (the paper), or any")
    launch.add_arguments(p, recipe.MAX_TOKENS, TOKENS_PER_UPDATE, "3584 x 8 GPUs x 16")
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
    launch.check_numbers(args)


def world_layout(args):
    """(gpus per node, nodes, processes in all, launcher)."""
    check_numbers(args)
    return launch.world_layout(args)


def fairseq_flags(args, world):
    arch, layer_flags = resolve_arch(args.arch, args.layers)
    uf = launch.update_freq(args.tokens_per_update, world, args.max_tokens)
    flags = [("--arch", arch)] + layer_flags + hyperparameters(args.layers)
    flags += [("--max-tokens", str(args.max_tokens)), ("--update-freq", str(uf))]
    return flags


def save_dir_of(args):
    return args.save_dir or os.path.join("checkpoints", "wmt16_en_de", f"{args.arch}_{args.layers}l")


def build_command(args):
    """The full command line (a list) that this launch runs."""
    layout = world_layout(args)
    save = save_dir_of(args)
    flags = fairseq_flags(args, layout.world)
    flags += [("--save-dir", save), ("--log-format", "json"), ("--log-interval", "100"),
              ("--log-file", os.path.join(save, "train.log"))]
    if args.tensorboard:
        flags.append(("--tensorboard-logdir", os.path.join(save, "tb")))
    flags += launch.device_flags(layout, args, fp16=not args.no_fp16)
    return launch.command(layout, args, [args.data] + launch.flags_to_argv(flags) + args.extra)


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
