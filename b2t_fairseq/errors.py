"""The project's one exception root.

Anything the user can fix raises :class:`B2TError` (or a subclass) with a message that names the
problem and the fix, ``"problem; fix"``. The console commands print it as one line
(``PROG: error: problem; fix``, exit status 2: see ``commands.run_command``); the plugin core never
prints or exits itself.
"""


class B2TError(Exception):
    """An error whose message already names the problem and the fix."""


class B2TConfigError(B2TError, ValueError):
    """A model flag combination the plugin refuses (raised while fairseq parses or builds)."""


class CheckpointError(B2TError):
    """A checkpoint file that cannot be read; ``path`` names it, ``reason`` says why.

    ``kind`` is "corrupt" (truncated or damaged bytes) or "unsafe" (torch's weights-only loader
    refuses an object in it); the console commands add the fix that fits their flags.
    """

    def __init__(self, path, reason, kind="corrupt"):
        self.path, self.reason, self.kind = path, reason, kind
        super().__init__(f"checkpoint {path} cannot be read ({reason})")


class FairseqMissing(B2TError, ImportError):
    """No fairseq is importable: the plugin does not install one (it would replace the user's)."""
