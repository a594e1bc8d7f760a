"""The demo's child processes (b2t-train, b2t-generate, fairseq-preprocess) die with the demo.

Each child runs in its own process group (so a stop reaches its own children too) and, on Linux,
asks the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``): a ``kill -9`` of
the demo takes its children down with it. A SIGTERM, SIGHUP or Ctrl-C of the demo goes through
:func:`stop_all`, which ends every process group it started and makes the worker threads stop
instead of starting the next run.
"""

import ctypes
import os
import signal
import subprocess
import sys
import threading

PR_SET_PDEATHSIG = 1
_LIBC = None
if sys.platform.startswith("linux"):
    try:
        _LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: nothing may be imported after fork
    except OSError:  # pragma: no cover - no libc symbols: the stop handler still ends the children
        _LIBC = None

_children = set()
_lock = threading.RLock()  # re-entered when a stop signal arrives while popen holds it
STOPPING = threading.Event()


class Stopped(KeyboardInterrupt):
    """Raised in a worker thread when the demo is being stopped (no new child is started)."""


def _die_with(parent_pid):
    def preexec():
        if _LIBC is not None:
            _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


def popen(cmd, **kw):
    """subprocess.Popen in a new process group that dies with this process; registered for stop_all."""
    with _lock:
        if STOPPING.is_set():
            raise Stopped()
        p = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with(os.getpid()), **kw)
        _children.add(p)
    return p


def forget(p):
    with _lock:
        _children.discard(p)


def run(cmd, **kw):
    """Like subprocess.run(cmd, capture_output=True, text=True), through :func:`popen`."""
    p = popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    try:
        out, err = p.communicate()
    finally:
        if p.poll() is None:
            _kill_group(p, signal.SIGKILL)
        forget(p)
    if STOPPING.is_set():
        raise Stopped()
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _kill_group(p, sig):
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all(timeout=5.0):
    """End every child process group: SIGTERM, then SIGKILL for those still running after timeout."""
    STOPPING.set()
    with _lock:
        procs = list(_children)
    for p in procs:
        _kill_group(p, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(p, signal.SIGKILL)  # its own children may still be there
    return procs


def install_stop_handlers():
    """SIGTERM and SIGHUP stop the demo like Ctrl-C: children ended, then KeyboardInterrupt here.
    (The demo clears STOPPING when its run ends, so no stop is left for a later call in this process.)"""
    def handler(signum, frame):
        stop_all()
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, handler)


def stop_group(p, timeout=5.0):
    """SIGTERM the child's process group, SIGKILL it if still there after timeout."""
    _kill_group(p, signal.SIGTERM)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    _kill_group(p, signal.SIGKILL)
