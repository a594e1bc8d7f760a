"""The tools' one-line error, and the test of what ``run_command`` prints as one line.

The tools raise :class:`ToolError` with a message that names the problem and the fix, ``"problem; fix"``.
It is not the plugin's ``b2t_fairseq.errors.B2TError`` because text-only commands (the WMT tokenizer
stages, the results table) must run without importing the plugin, which imports torch and fairseq.
"""

import sys


class ToolError(Exception):
    """An error whose message already names the problem and the fix."""


def plugin_error(name):
    """The plugin's error class of that name, or () while the plugin is not imported (so it raised none)."""
    return getattr(sys.modules.get("b2t_fairseq.errors"), name, ())


def is_one_line(e):
    """A ToolError or the plugin's B2TError: its message is the whole story."""
    return isinstance(e, (ToolError, plugin_error("B2TError")))
