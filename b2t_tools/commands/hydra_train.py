"""``b2t-hydra-train``'s work inside ``cli.run_fairseq``: fairseq-hydra-train with the configs' resolver and
Hydra's own errors as one line.

Hydra prints its errors (a bad override, a key not in the config, a config that is not there) as a trimmed
traceback and exits 1; fairseq composes a config name it cannot find from its own defaults and trains
something else. Here the command line is read by Hydra's own parser first, the config is looked up, and
Hydra is asked to raise (HYDRA_FULL_ERROR) so that its exceptions become ``PROG: error: problem; fix``.
"""

import os
import sys

from ..errors import ToolError
from ..hydra_configs import register_resolvers


def _parse(argv):
    """Hydra's own reading of the command line; its complaints (argparse's usage block) become one line."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message):
        raise ToolError(f"{message}; run b2t-hydra-train --help for Hydra's flags, and give the config's values "
                        "as KEY=VALUE after them")

    parser.error = error
    return parser.parse_intermixed_args(argv)  # overrides may come before Hydra's flags (b2t-train's habit)


def check_config(args):
    """The named config must exist: fairseq would otherwise train from its own defaults under that name."""
    from fairseq_cli import hydra_train

    if args.help or args.hydra_help or args.info or not args.config_name or "://" in (args.config_path or ""):
        return  # a pkg:// or file:// search path: Hydra's to read
    app_dir = os.path.dirname(hydra_train.__file__)  # a relative --config-path is relative to fairseq's hydra_train.py
    folders = [f for f in (args.config_dir, args.config_path and os.path.join(app_dir, args.config_path),
                           os.path.join(app_dir, "..", "fairseq", "config")) if f]
    if args.config_dir and not os.path.isdir(args.config_dir):
        raise ToolError(f"--config-dir {args.config_dir} is not a folder; pass the folder that holds the configs "
                        "(this repository's configs/)")
    name = args.config_name[:-5] if args.config_name.endswith(".yaml") else args.config_name
    if name == "config" or any(os.path.isfile(os.path.join(f, name + ".yaml")) for f in folders):
        return
    where = args.config_dir or args.config_path
    known = sorted(n[:-5] for n in os.listdir(where) if n.endswith(".yaml")) if where and os.path.isdir(where) else []
    choices = f"one of {', '.join(known)}" if known else "--config-dir DIR with a config of that name"
    raise ToolError(f"--config-name {args.config_name}: no {name}.yaml in {where or 'the config path'}; pass {choices}")


def _one_line(e):
    """The one-line error for a Hydra or OmegaConf exception (or a ToolError raised inside one), else None."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    chain, x = [], e
    while x is not None and x not in chain:
        chain.append(x)
        x = x.__cause__ or x.__context__
    for x in chain:
        if isinstance(x, ToolError):  # the update_freq resolver's refusal
            return x
    if not isinstance(e, (HydraException, OmegaConfBaseException)):
        return None
    lines = [ln.strip() for x in chain for ln in str(x).splitlines() if ln.strip()]
    problem = [ln for ln in lines if ln != "None" and "$VALUE" not in ln  # OmegaConf's message templates
               and not ln.startswith(("full_key:", "reference_type=", "object_type=", "See https", "To append"))]
    append = next((ln for ln in lines if ln.startswith("To append")), None)
    fix = "check the key and value (b2t-hydra-train --config-dir DIR --config-name NAME --cfg job prints the config)"
    if append:
        fix = f"check the key's spelling ({fix[len('check the key and value ('):-1]}); {append[0].lower()}{append[1:]}"
    return ToolError(f"{' '.join(dict.fromkeys(problem))}; {fix}")


class _WithoutHydraJobLine:
    """stderr without the line Hydra writes before it raises a job's error (the error itself is one line)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        if text.startswith("Error executing job with overrides:"):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main():
    """fairseq-hydra-train's cli_main on sys.argv (cli.run_fairseq has added the plugin's user_dir)."""
    from fairseq_cli.hydra_train import cli_main

    args = _parse(sys.argv[1:])
    check_config(args)
    overrides = set(args.overrides)  # Hydra's own parser wants them last: `KEY=V --cfg job` would be refused
    sys.argv = sys.argv[:1] + [a for a in sys.argv[1:] if a not in overrides] + list(args.overrides)
    register_resolvers()
    before, stderr = os.environ.get("HYDRA_FULL_ERROR"), sys.stderr
    sys.stderr = _WithoutHydraJobLine(stderr)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing a trimmed traceback
    try:
        return cli_main()
    except Exception as e:  # noqa: BLE001 - Hydra's and OmegaConf's errors become one line; the rest re-raise
        err = _one_line(e)
        if err is None:
            raise
        raise err from None
    finally:
        sys.stderr = stderr
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before
