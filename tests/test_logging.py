"""Our commands log as fairseq's entry points do (b2t_tools/util.py's fairseq_logging)."""

import io
import logging
import sys

import pytest

from b2t_tools import util


@pytest.fixture
def restore_root_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_records_go_to_the_current_stdout_in_fairseqs_format(monkeypatch, capsys, restore_root_logging):
    """A command run in-process (a test, a notebook) sets logging up with the sys.stdout of that moment;
    once that stream is closed, later records must reach the new sys.stdout, not a '--- Logging error ---'."""
    first = io.StringIO()
    monkeypatch.setattr(sys, "stdout", first)
    util.fairseq_logging(sys.stdout)
    logging.getLogger("b2t.test").info("one")
    assert first.getvalue().endswith(" | INFO | b2t.test | one\n")
    first.close()

    second = io.StringIO()
    monkeypatch.setattr(sys, "stdout", second)
    logging.getLogger("b2t.test").info("two")
    assert second.getvalue().endswith(" | INFO | b2t.test | two\n")
    assert "Logging error" not in capsys.readouterr().err
