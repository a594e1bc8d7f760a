"""Console commands: fairseq's own, with the plugin loaded.

``b2t-train ARGS`` is ``fairseq-train --user-dir <this package> ARGS``, and so on for generate,
interactive, validate, eval-lm (fairseq-eval-lm) and hydra-train. The plugin directory is passed
as ``--user-dir`` (not just imported) so that fairseq records it and spawned workers load it too.
Known failures (bad flags, missing data, broken checkpoints, an fp16 collapse: see explain.py) are
printed as one line, not a traceback. (Checkpoint safety is installed by importing the plugin: see repairs.py.)

Without the console scripts: ``python -m b2t_tools.commands.cli {train,generate,interactive,validate,
eval-lm,hydra-train} ARGS``.
"""

import importlib.util
import os
import sys

from b2t_fairseq.fast import translate_argv

from ..errors import ToolError
from . import authors_argv, run_command
from .explain import check_args_before_fairseq
from .preflight import finished_run

# the plugin's folder, found without importing it (fairseq imports it from --user-dir)
PLUGIN_DIR = importlib.util.find_spec("b2t_fairseq").submodule_search_locations[0]


def _with_user_dir(argv, hydra=False):
    """Return argv with the plugin's --user-dir; another copy of b2t_fairseq given there is replaced."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        value = None
        if a == "--user-dir" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif a.startswith("--user-dir="):
            value, i = a.split("=", 1)[1], i + 1
        elif hydra and a.startswith("common.user_dir="):
            value, i = a.split("=", 1)[1], i + 1
        else:
            out.append(a)
            i += 1
            continue
        if os.path.basename(os.path.normpath(value)) != "b2t_fairseq":
            raise ToolError(f"--user-dir {value}: the b2t commands load the b2t_fairseq plugin themselves and "
                           "fairseq takes one --user-dir; use fairseq-train for other plugins")
        if os.path.realpath(value) != os.path.realpath(PLUGIN_DIR):
            print(f"b2t: note: using the installed plugin {PLUGIN_DIR}, not --user-dir {value}", file=sys.stderr)
    if hydra:  # hydra takes its overrides after --config-dir/--config-name
        return out + ["common.user_dir=" + PLUGIN_DIR]
    return ["--user-dir", PLUGIN_DIR] + out


def run_fairseq(main, argv=None, hydra=False, prog=None):
    """Run a fairseq entry point with the plugin; known failures become one line (exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0])

    def work():
        nonlocal argv
        if prog == "b2t-train":
            argv = authors_argv.translate(argv)  # the authors' train.py flags (authors_argv.py)
        if not hydra:
            argv = translate_argv(argv)  # --b2t-fast: --optimizer adam -> b2t_adam (fast.py)
            check_args_before_fairseq(argv, prog)
            if prog == "b2t-train":
                done = finished_run(argv)  # fairseq would train one more update (preflight.py)
                if done:
                    print(f"{prog}: {done}", file=sys.stderr)
                    return 0
        sys.argv = [prog] + _with_user_dir(argv, hydra=hydra)
        return main()

    rc = run_command(prog, work)
    if rc:
        raise SystemExit(rc)
    return rc


def train(argv=None):
    from fairseq_cli.train import cli_main

    return run_fairseq(cli_main, argv, prog="b2t-train")


def generate(argv=None):
    from fairseq_cli.generate import cli_main

    return run_fairseq(cli_main, argv, prog="b2t-generate")


def interactive(argv=None):
    from fairseq_cli.interactive import cli_main

    return run_fairseq(cli_main, argv, prog="b2t-interactive")


def validate(argv=None):
    from fairseq_cli.validate import cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--task" or a.startswith("--task=") for a in argv):
        # fairseq-validate has no default task and fails with "KeyError: None"; the plugin's
        # models are translation models
        argv = ["--task", "translation"] + argv
    return run_fairseq(cli_main, argv, prog="b2t-validate")


def eval_lm(argv=None):
    from fairseq_cli.eval_lm import cli_main

    return run_fairseq(cli_main, argv, prog="b2t-eval-lm")


def hydra_train(argv=None):
    from fairseq_cli.hydra_train import cli_main

    return run_fairseq(cli_main, argv, hydra=True, prog="b2t-hydra-train")


COMMANDS = {"train": train, "generate": generate, "interactive": interactive, "validate": validate,
            "eval-lm": eval_lm, "hydra-train": hydra_train}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"b2t_tools.commands.cli: error: no command given; run python -m b2t_tools.commands.cli "
              f"{{{','.join(COMMANDS)}}} ARGS...", file=sys.stderr)
        sys.exit(2)
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
