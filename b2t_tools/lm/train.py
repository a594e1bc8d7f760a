"""``b2t-lm-train DATA --arch ARCH --layers N``: the WikiText-103 language-model recipe (b2t_fairseq/recipe.py).

Runs ``b2t-train`` with the recipe's flags (fairseq's examples/language_model command: Adam, inverse_sqrt,
512-token samples) for one layer type and depth. The tokens per update are kept at the recipe's
2 GPUs x 2048 tokens x 16: ``--update-freq`` is ``tokens_per_update / (gpus * max_tokens)``, and a setup
where that is not a whole number is refused. ``--dry-run`` prints the command. An interrupted run
resumes from SAVE_DIR/checkpoint_last.pt (fairseq's own resume); anything after ``--`` goes to fairseq.
"""

import argparse
import os
import shlex
import subprocess
import sys

from b2t_fairseq import layer_types, recipe

from ..commands import run_command
from ..errors import ToolError
from ..util import split_at_dashes

PROG = "b2t-lm-train"
ARCHS = tuple(t.lm_family for t in layer_types.LAYER_TYPES)


def command(data, arch, layers, save_dir, gpus=1, max_tokens=recipe.LM_MAX_TOKENS, cpu=False, extra=()):
    if arch not in ARCHS:
        raise ToolError(f"--arch {arch}: choose one of {', '.join(ARCHS)} (the depth comes from --layers)")
    if layers < 1 or gpus < 1 or max_tokens < 1:
        raise ToolError("--layers, --gpus and --max-tokens must be at least 1; the recipe uses --layers "
                        f"{' or '.join(map(str, recipe.LM_DEPTHS))}")
    freq, rest = divmod(recipe.LM_TOKENS_PER_UPDATE, gpus * max_tokens)
    if rest or freq < 1:
        raise ToolError(f"{gpus} GPU(s) x --max-tokens {max_tokens} does not divide the recipe's "
                        f"{recipe.LM_TOKENS_PER_UPDATE} tokens per update; pick --max-tokens so that "
                        f"gpus x max-tokens divides it (e.g. {recipe.LM_MAX_TOKENS})")
    flags = dict(recipe.lm_flags(layers))
    flags["--max-tokens"] = str(max_tokens)
    argv = [os.path.join(os.path.dirname(sys.executable), "b2t-train"), str(data), "--arch", arch,
            *recipe.flags_to_argv(flags.items()), "--update-freq", str(freq), "--save-dir", str(save_dir)]
    if cpu:
        argv.append("--cpu")
    else:
        argv += ["--fp16", "--distributed-world-size", str(gpus)]  # fairseq's README trains in fp16
    return argv + list(extra)


def parse_args(argv):
    argv, extra = split_at_dashes(argv)
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="binarized WikiText-103 (b2t-lm-prepare --dest)")
    p.add_argument("--arch", required=True, choices=ARCHS, help="the layer type (transformer_lm_b2t, ...)")
    p.add_argument("--layers", type=int, default=6, help=f"depth: {' or '.join(map(str, recipe.LM_DEPTHS))}")
    p.add_argument("--save-dir", help="default: checkpoints/lm/ARCH_Nl")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=recipe.LM_MAX_TOKENS)
    p.add_argument("--cpu", action="store_true", help="train on CPU (fp32; for trying the recipe out)")
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    args = p.parse_args(argv)
    args.extra = extra
    return args


def run(argv):
    args = parse_args(argv)
    if not os.path.isfile(os.path.join(args.data, "dict.txt")):
        raise ToolError(f"{args.data} has no dict.txt: it is not a binarized language-model corpus; run "
                        "b2t-lm-prepare first (or fairseq-preprocess --only-source)")
    save = args.save_dir or os.path.join("checkpoints", "lm", f"{args.arch}_{args.layers}l")
    cmd = command(args.data, args.arch, args.layers, save, args.gpus, args.max_tokens, args.cpu, args.extra)
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    return subprocess.call(cmd)


def main(argv=None):
    return run_command(PROG, run, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
