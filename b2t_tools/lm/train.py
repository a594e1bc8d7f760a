"""``b2t-lm-train DATA --arch ARCH --layers N``: the WikiText-103 language-model recipe (b2t_fairseq/recipe.py).

Runs ``b2t-train`` with the recipe's flags (fairseq's examples/language_model command: Adam, inverse_sqrt,
512-token samples) for one layer type and depth, on one GPU, many GPUs, many nodes (torchrun or SLURM) or
CPU processes: the launchers of ``scripts/train.sh`` (b2t_tools/launch.py). The tokens per update are kept at
the recipe's 2 GPUs x 2048 tokens x 16: ``--update-freq`` is ``tokens_per_update / (GPUs x nodes x
max_tokens)``, and a setup where that is not a whole number is refused with the fix. ``--dry-run`` prints
the command and needs no data. An interrupted run resumes from SAVE_DIR/checkpoint_last.pt (fairseq's own
resume); anything after ``--`` goes to fairseq.
"""

import argparse
import os
import shlex
import subprocess
import sys
from types import SimpleNamespace

from b2t_fairseq import layer_types, recipe

from .. import launch
from ..commands import run_command
from ..errors import ToolError
from ..util import split_at_dashes

PROG = "b2t-lm-train"
ARCHS = tuple(t.lm_family for t in layer_types.LAYER_TYPES)


def _layout_args(gpus, cpu, max_tokens, tokens_per_update, **launch_args):
    """What launch.world_layout reads, for command()'s callers that give only a GPU count."""
    args = SimpleNamespace(gpus=0 if cpu else gpus, nodes=None, node_rank=0, master_addr="127.0.0.1",
                           master_port=29500, launcher="auto", cpu_procs=1, max_tokens=max_tokens,
                           tokens_per_update=tokens_per_update, recipe_max_tokens=recipe.LM_MAX_TOKENS,
                           recipe_tokens_per_update=recipe.LM_TOKENS_PER_UPDATE)
    args.__dict__.update(launch_args)
    return args


def command(data, arch, layers, save_dir, gpus=1, max_tokens=recipe.LM_MAX_TOKENS, cpu=False, extra=(),
            tokens_per_update=recipe.LM_TOKENS_PER_UPDATE, launch_args=None):
    """The full command line (a list): ``b2t-train DATA`` with the recipe's flags, under its launcher.

    launch_args: the launch flags as parsed (launch.add_arguments); without them, ``gpus`` GPUs on one node
    (``cpu``: one CPU process)."""
    if arch not in ARCHS:
        raise ToolError(f"--arch {arch}: choose one of {', '.join(ARCHS)} (the depth comes from --layers)")
    if layers < 1:
        raise ToolError(f"--layers {layers} must be at least 1; the recipe uses --layers "
                        f"{' or '.join(map(str, recipe.LM_DEPTHS))}")
    args = launch_args or _layout_args(gpus, cpu, max_tokens, tokens_per_update)
    layout = launch.world_layout(args)
    freq = launch.update_freq(args.tokens_per_update, layout.world, args.max_tokens)
    flags = dict(recipe.lm_flags(layers))
    flags["--max-tokens"] = str(args.max_tokens)
    fairseq_args = [str(data), "--arch", arch, *recipe.flags_to_argv(flags.items()), "--update-freq", str(freq),
                    "--save-dir", str(save_dir)]
    fairseq_args += launch.flags_to_argv(launch.device_flags(layout, args))  # fairseq's README trains in fp16
    return launch.command(layout, args, fairseq_args + list(extra))


def parse_args(argv):
    argv, extra = split_at_dashes(argv)
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog="Everything after -- is passed to fairseq unchanged (and wins over the "
                                       "recipe's flags).")
    p.add_argument("data", help="binarized WikiText-103 (b2t-lm-prepare --dest)")
    p.add_argument("--arch", required=True, choices=ARCHS, help="the layer type (transformer_lm_b2t, ...)")
    p.add_argument("--layers", type=int, default=6, help=f"depth: {' or '.join(map(str, recipe.LM_DEPTHS))}")
    p.add_argument("--save-dir", help="default: checkpoints/lm/ARCH_Nl")
    launch.add_arguments(p, recipe.LM_MAX_TOKENS, recipe.LM_TOKENS_PER_UPDATE, "2048 x 2 GPUs x 16")
    p.add_argument("--cpu", action="store_true", help="train on CPU (fp32; the same as --gpus 0)")
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing (needs no data)")
    args = p.parse_args(argv)
    args.extra = extra
    if args.cpu:
        args.gpus = 0
    return args


def run(argv):
    args = parse_args(argv)
    save = args.save_dir or os.path.join("checkpoints", "lm", f"{args.arch}_{args.layers}l")
    cmd = command(args.data, args.arch, args.layers, save, extra=args.extra, launch_args=args)
    if not args.dry_run and not os.path.isfile(os.path.join(args.data, "dict.txt")):
        raise ToolError(f"{args.data} has no dict.txt: it is not a binarized language-model corpus; run "
                        "b2t-lm-prepare first (or fairseq-preprocess --only-source)")
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    return subprocess.call(cmd)


def main(argv=None):
    return run_command(PROG, run, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
