"""The console commands (``b2t-*``) and the one way they report errors.

Every command runs its work through :func:`run_command`: a one-line error (:func:`b2t_tools.errors.is_one_line`)
becomes one line ``PROG: error: problem; fix`` on stderr and exit status 2, Ctrl-C one line and
exit status 130. Failures inside fairseq that we know (see ``explain.py``) are translated into
one-line errors first; anything else keeps its traceback: it is a bug to see, not a user error.
"""

import sys


def error_line(prog, msg):
    return f"{prog}: error: {' '.join(str(msg).split())}"


def run_command(prog, fn, *args, **kwargs):
    """Run a command's work and return its exit status (fn's int result, or 0)."""
    from .explain import explain

    try:
        rc = fn(*args, **kwargs)
    except KeyboardInterrupt as e:
        # fairseq's --heartbeat-timeout interrupts a stuck worker: name what it was stuck in
        ctx = None if e.__suppress_context__ else e.__context__  # "from None": nothing else to name
        why = f" while handling {type(ctx).__name__}: {(str(ctx).splitlines() or [''])[0][:300]}" if ctx else ""
        print(f"{prog}: interrupted{why}; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one-line errors and known fairseq failures; the rest re-raise
        msg = explain(e, prog)  # a one-line error's own message (a CheckpointError's plus the fix for this command)
        if msg is None:
            raise
        print(error_line(prog, msg), file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0


def main_of(prog, fn):
    """A console entry point: ``sys.exit(run_command(prog, fn))``."""
    def entry(argv=None):
        return run_command(prog, fn, sys.argv[1:] if argv is None else list(argv))
    entry.__name__ = fn.__name__
    return entry
