"""Console commands: fairseq's own, with the plugin loaded.

``b2t-train ARGS`` is ``fairseq-train --user-dir <this package> ARGS``, and so on for generate,
interactive, validate, eval-lm (fairseq-eval-lm) and hydra-train. The plugin directory is passed as ``--user-dir`` (not just
imported) so that fairseq records it and spawned workers load it too. The command line is read once,
by fairseq's own parser for that command (``parse_args``), after the authors' flags are translated
(authors_argv.py); the checks of preflight.py run on what it read. Known failures (bad flags, missing
data, broken checkpoints, an fp16 collapse: see explain.py) are printed as one line, not a traceback.
Importing the plugin repairs fairseq; these commands also enable its behaviour changes (exact resume,
the checkpoint-must-fit-its-data check: b2t_fairseq/patches/__init__.py). They log as fairseq's own
commands do (fairseq's format, on stdout: util.fairseq_logging), without the deprecation warnings fairseq
itself triggers (util.FAIRSEQ_WARNINGS); ``b2t-train --arch X --help`` lists X's model flags.

Without the console scripts: ``python -m b2t_tools.commands.cli {train,generate,interactive,validate,
eval-lm,hydra-train} ARGS``.
"""

import importlib.util
import os
import sys

from ..util import quiet_fairseq_warnings

quiet_fairseq_warnings()  # before fairseq is imported: some fire at import (util.FAIRSEQ_WARNINGS)

from b2t_fairseq import patches, run_guards  # noqa: E402
from b2t_fairseq.fast import FAST_FLAG, translate_argv  # noqa: E402

from ..errors import ToolError, is_one_line  # noqa: E402
from ..util import fairseq_logging, flag_value, has_flag, wants_help  # noqa: E402
from . import authors_argv, preflight, run_command  # noqa: E402
from . import preflight_setup  # noqa: E402

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


# fairseq's parser for each command (fairseq.options)
PARSERS = {"b2t-train": "get_training_parser", "b2t-generate": "get_generation_parser",
           "b2t-interactive": "get_interactive_generation_parser", "b2t-validate": "get_validation_parser",
           "b2t-eval-lm": "get_eval_lm_parser"}


def parse_args(prog, argv):
    """argv (with --user-dir, so the plugin's flags exist) read by fairseq's parser for ``prog``.

    The same parse fairseq's entry point makes; its complaints (argparse's usage block plus an error)
    become one line.
    """
    from fairseq import options

    parser = getattr(options, PARSERS[prog])()
    _errors_as_one_line(parser, prog)
    try:
        return options.parse_args_and_arch(parser, argv)
    except ValueError as e:  # fairseq's own checks while parsing ("Cannot combine --fp16 and --tpu ...")
        if is_one_line(e):
            raise
        raise ToolError(f"{e}; fix the flags") from None


def _errors_as_one_line(parser, prog):
    """argparse's complaints (a usage block plus an error) raised as one ToolError line."""

    def error(message):
        if "(choose from" in message and message.count(",") > 12:  # every registered architecture: hundreds
            message = message.split(" (choose from")[0] + f" (run {prog} --help for the choices)"
        fix = f"see {prog} --help for the flags"
        if "invalid int value" in message:
            fix = "give a whole number"
        elif "invalid float value" in message:
            fix = "give a number such as 0.1 or 1e-4"
        elif "unrecognized arguments" in message and FAST_FLAG in message.split() and prog != "b2t-train":
            fix = (f"{FAST_FLAG} is a b2t-train flag that the checkpoint keeps; to decode a checkpoint trained without "
                   f"it on the fast kernels, pass --model-overrides \"{{'b2t_fast': True}}\"")
        raise ToolError(f"{message}; {fix}")

    parser.error = error  # argparse reports every bad value through it


def print_help(prog, argv):
    """fairseq's --help, with the model flags of the --arch given (fairseq adds them only after a first
    parse, which --help would end: fairseq-train --arch X --help shows none). The first parse here skips
    --help; the second, with the architecture's flags added, prints the help and exits."""
    from fairseq import options

    parser = getattr(options, PARSERS[prog])()
    first = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        parser.parse_known_args = first  # from now on (parse_args) --help is seen
        return first([a for a in args if a not in ("-h", "--help")], namespace)

    parser.parse_known_args = parse_known_args
    _errors_as_one_line(parser, prog)
    options.parse_args_and_arch(parser, argv)


def run_fairseq(main, argv=None, hydra=False, prog=None, setup=None):
    """Run a fairseq entry point with the plugin; known failures become one line (exit 2).

    ``setup(args)``, if given, runs on the parsed arguments before fairseq starts.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0])
    patches.enable_behaviour()

    # where fairseq's own command logs, in its format (util.fairseq_logging); fairseq-generate sets its own
    fairseq_logging(None if prog == "b2t-generate" else sys.stdout)

    def work():
        nonlocal argv
        if wants_help(argv) and prog == "b2t-train" and (flag_value(argv, "--arch") or flag_value(argv, "-a")):
            sys.argv = [prog] + _with_user_dir(argv)
            return print_help(prog, _with_user_dir(argv))
        if hydra or wants_help(argv):  # hydra reads its own overrides; --help is fairseq's to print
            sys.argv = [prog] + _with_user_dir(argv, hydra=hydra)
            return main()
        if prog == "b2t-train":
            argv = authors_argv.translate(argv)  # the authors' train.py flags (authors_argv.py)
        argv = _with_user_dir(translate_argv(argv))  # --b2t-fast: --optimizer adam -> b2t_adam (fast.py)
        sys.argv = [prog] + argv  # fairseq's parser factories read --user-dir from sys.argv itself
        args = parse_args(prog, argv)
        bf16 = preflight_setup.bf16_argv(args, argv, prog)  # fairseq's --bf16 means a TPU (preflight_setup.py)
        if bf16 is not None:
            print(f"{prog}: note: --bf16 runs as the plugin's --b2t-bf16 (bf16 autocast, fp32 weights; fairseq's "
                  "--bf16 is for TPUs)", file=sys.stderr)
            argv = bf16
            sys.argv = [prog] + argv
            args = parse_args(prog, argv)
        preflight.check(args, prog)
        if prog == "b2t-train":
            lock_save_dir(args)  # one writer per --save-dir, before reading its checkpoints
            preflight.check_resume(args)  # another layer type or other data (preflight.py)
            preflight.check_resume_setup(args)  # another schedule or Admin omega (preflight.py)
            done = preflight.finished_run(args)  # fairseq would train one more update (preflight.py)
            if done:
                print(f"{prog}: {done}", file=sys.stderr)
                return 0
            claim_save_dir(args, prog)  # write our pid in the lock only now: a finished run touches nothing
        if setup is not None:
            setup(args)
        return main()

    held_before = run_guards.held()  # a sweep's forked cell keeps its parent's lock
    try:
        rc = run_command(prog, work)
    finally:  # several commands may run in one process (tests, the wmt driver); Hydra runs lock in the plugin
        run_guards.release_locks(keep=held_before)
    if rc:
        raise SystemExit(rc)
    return rc


LOCK_NAME = run_guards.LOCK_NAME


def lock_save_dir(args):
    """Refuse a second writer of the same --save-dir (they would share NAME.tmp files and one would resume
    from the other's checkpoint): run_guards.lock_dir, the lock every training entry point takes (the
    plugin takes it again, a no-op here, where fairseq resumes). Only the process that writes checkpoints
    takes it (global rank 0 under torchrun; fairseq's own spawned workers inherit it)."""
    if getattr(args, "no_save", False) or os.environ.get("RANK", "0") != "0":
        return
    run_guards.lock_dir(getattr(args, "save_dir", None) or "checkpoints", "--save-dir", "training run")


def claim_save_dir(args, prog=None):
    """Write who holds the --save-dir lock into it (named by a second writer refused)."""
    if not getattr(args, "no_save", False):
        run_guards.claim(getattr(args, "save_dir", None) or "checkpoints", prog)


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
    if not has_flag(argv, "--task"):
        # fairseq-validate has no default task and fails with "KeyError: None"; the plugin's
        # models are translation models
        argv = ["--task", "translation"] + argv
    return run_fairseq(cli_main, argv, prog="b2t-validate")


def eval_lm(argv=None):
    from fairseq_cli.eval_lm import cli_main

    return run_fairseq(cli_main, argv, prog="b2t-eval-lm")


def hydra_train(argv=None):
    from .hydra_train import main  # the configs' resolver, and Hydra's errors as one line (hydra_train.py)

    return run_fairseq(main, argv, hydra=True, prog="b2t-hydra-train")


COMMANDS = {"train": train, "generate": generate, "interactive": interactive, "validate": validate,
            "eval-lm": eval_lm, "hydra-train": hydra_train}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"b2t_tools.commands.cli: error: no command given; run python -m b2t_tools.commands.cli "
              f"{{{','.join(COMMANDS)}}} ARGS...", file=sys.stderr)
        sys.exit(2)
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
