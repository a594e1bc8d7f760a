"""Clear one-line errors for the console commands.

Each known failure is turned into ``PROG: error: <problem>; <fix>`` on stderr and exit status 2,
instead of a traceback from deep inside fairseq.
"""

import contextlib
import sys


class B2TError(Exception):
    """An error whose message already names the problem and the fix."""


def fail(prog, msg, code=2):
    print(f"{prog}: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def check_args_before_fairseq(argv, prog):
    """Checks that are cheap to make before fairseq starts (filled in as failures are catalogued)."""
    return None


@contextlib.contextmanager
def one_line_errors(prog):
    from .transformer_b2t import B2TConfigError

    try:
        yield
    except (B2TConfigError, B2TError) as e:
        fail(prog, str(e))
