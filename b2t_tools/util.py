"""Small helpers shared by the commands and tools (one copy of each)."""

import contextlib
import hashlib
import json
import os
import platform
import re
import sys
import threading
import time

TMP_SUFFIX = ".tmp"
_print_lock = threading.Lock()


@contextlib.contextmanager
def atomic_open(path, mode="w", encoding="utf-8"):
    """Open ``path + .tmp`` for writing; on success fsync it and rename it over ``path``.

    At every moment ``path`` is either absent, the old file, or the complete new one; a failure
    or a kill leaves at most a stray ``.tmp`` (which the next write replaces).
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + TMP_SUFFIX
    kw = {} if "b" in mode else {"encoding": encoding, "newline": "\n"}
    try:
        with open(tmp, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def atomic_write(path, data):
    """Write text or bytes to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb" if isinstance(data, (bytes, bytearray)) else "w") as f:
        f.write(data)


def write_json(path, obj):
    """``obj`` as indented JSON at ``path``, atomically, creating the folder."""
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


def check_writable(path, flag):
    """Raise ToolError unless a file can be written at ``path`` (its folder is created if missing).

    Call it before long work, so a bad output place fails in a second, not after hours: it tries
    the folder and a probe file ``path + .tmp`` (removed again), which catches a folder given as a
    file, a path under a regular file, a read-only or full file system and permissions.
    """
    from .errors import ToolError

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ToolError(f"{flag} {path} is a folder; give the path of a file for {flag}")
    folder = os.path.dirname(os.path.abspath(path))
    above = folder
    while not os.path.exists(above) and os.path.dirname(above) != above:
        above = os.path.dirname(above)
    if os.path.exists(above) and not os.path.isdir(above):
        raise ToolError(f"cannot write {flag} {path}: {above} is a file, not a folder; choose another place "
                       f"for {flag}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path + TMP_SUFFIX, "wb"):
            pass
        os.remove(path + TMP_SUFFIX)
    except OSError as e:
        raise ToolError(f"cannot write {flag} {path} ({e.strerror or e}); choose a writable place for {flag}"
                       ) from None


def json_digest(obj, n=16):
    """The first n hex digits of the SHA-256 of obj's JSON (keys sorted): a key for what built something."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def file_digest(path, algo="sha256", n=None):
    """The hex digest of a file's bytes (read in 1 MiB blocks), cut to n digits if n is given."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]


def log(msg, stream=None):
    """A timestamped progress line, safe to call from several threads."""
    with _print_lock:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=stream or sys.stdout, flush=True)


# --- reading argv by hand: only where fairseq's parser cannot (before it exists, or to rewrite argv) ---

def flag_value(argv, flag):
    """The value of the last ``--flag VALUE`` or ``--flag=VALUE`` in argv, or None."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def split_at_dashes(argv):
    """(our arguments, fairseq's): everything after a bare -- goes to fairseq unchanged."""
    if "--" not in argv:
        return list(argv), []
    i = argv.index("--")
    return list(argv[:i]), list(argv[i + 1:])


def has_flag(argv, flag):
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def wants_help(argv):
    """-h/--help anywhere before a lone ``--``: the command prints its help, whatever else is wrong."""
    for a in argv:
        if a == "--":
            return False
        if a in ("-h", "--help"):
            return True
    return False


def machine():
    """What the numbers were measured on: a dict (cpu, cores, gpu, python, torch, fairseq)."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or platform.machine()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import fairseq

        info["fairseq"] = fairseq.__version__
    except ImportError:  # pragma: no cover - fairseq is a dependency
        pass
    return info


def describe_machine(info=None):
    info = info or machine()
    return (f"{info['cpu']}, {info['cpu_cores']} CPU cores, {info.get('gpu', 'no GPU')}, "
            f"torch {info['torch']}, fairseq {info.get('fairseq', '?')}")


# --- fairseq output ---------------------------------------------------------------------------

JSON_LINE = re.compile(r"\b(train_inner|valid|train)\b\s*[|:]\s*(\{.*\})\s*$")


def parse_json_log(lines):
    """fairseq's ``--log-format json`` records as ``(kind, dict)``; kind is train_inner, train or valid."""
    out = []
    for line in lines:
        m = JSON_LINE.search(line)
        if m:
            try:
                out.append((m.group(1), json.loads(m.group(2))))
            except json.JSONDecodeError:
                continue
    return out


def parse_generate_output(text, kind="D"):
    """fairseq-generate's ``D-i`` (detokenized) or ``H-i`` (tokenized) hypotheses, by sentence id."""
    hyps = {}
    for line in text.splitlines():
        if line.startswith(kind + "-"):
            head, _score, hyp = (line.split("\t") + ["", ""])[:3]
            hyps[int(head[2:])] = hyp
    return hyps


def pyplot():
    """matplotlib's pyplot on the Agg backend, without matplotlib's DEBUG chatter."""
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    logging.getLogger("PIL").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- logging and warnings as fairseq's own commands have them ---------------------------------

FAIRSEQ_LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"  # fairseq_cli/train.py's

# Warnings that fairseq itself triggers in every run: deprecations (its Hydra 1.0 calls, torch's old amp and
# jit API) and its pin_memory=True on a machine without a GPU. (category, message regex, module regex);
# only these are silenced, any other warning still shows.
FAIRSEQ_WARNINGS = (
    (UserWarning, r"hydra\.experimental\.(initialize|compose)\(\) is no longer experimental", r"hydra\.experimental\."),
    (UserWarning, r"\s*The version_base parameter is not specified", ""),
    (UserWarning, r"In '[^']*': Usage of deprecated keyword in package header", r"hydra\.core\.default_element"),
    (UserWarning, r"\s*'[^']*' is validated against ConfigStore schema with the same name", ""),
    (UserWarning, r"\s*The strict flag in the compose API is deprecated", r"hydra\.compose"),
    (FutureWarning, r"`torch\.cuda\.amp\.(autocast|GradScaler)\(args\.\.\.\)` is deprecated", r"fairseq\."),
    (UserWarning, r"Support for mismatched key_padding_mask and attn_mask is deprecated", r"torch\.nn\.functional"),
    (DeprecationWarning, r"`torch\.jit\.script` is deprecated", r"torch\.jit\."),
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found", r"torch\.utils\.data\."),
)


def quiet_fairseq_warnings():
    """Silence exactly FAIRSEQ_WARNINGS (by category, message and module); nothing else."""
    import warnings

    for category, message, module in FAIRSEQ_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


class _DropPluginReimport:
    """fairseq logs "--user-dir=... has already been imported." when our command imported the plugin
    before fairseq's parser did: true and harmless, and fairseq-train --user-dir does not print it."""

    def filter(self, record):
        return "has already been imported." not in record.getMessage()


_drop_plugin_reimport = _DropPluginReimport()


class _CurrentStdout:
    """Writes to whatever ``sys.stdout`` is when a record is logged, not the object it was at set-up:
    a command called in-process (tests, notebooks) must not keep logging into a stream since closed."""

    def write(self, text):
        return sys.stdout.write(text)

    def flush(self):
        sys.stdout.flush()


def fairseq_logging(stream):
    """Root logging as fairseq's entry points set it: FAIRSEQ_LOG_FORMAT to ``stream`` (stdout), at
    $LOGLEVEL (INFO). It replaces what was there: importing fairseq's models runs a
    ``logging.basicConfig(level=DEBUG)`` (wav2vec2_classification.py) that would otherwise win, sending
    everything to stderr as "INFO:name:...". ``stream=None`` only clears it, for an entry point that
    configures logging itself later (fairseq-generate logs into its --results-path file)."""
    import logging

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    logging.getLogger("fairseq.utils").addFilter(_drop_plugin_reimport)  # added once (same object)
    level = os.environ.get("LOGLEVEL", "INFO").upper()
    if stream is None:
        root.setLevel(logging.WARNING)  # logging's default, until the entry point sets its own
        return
    if stream is sys.stdout:
        stream = _CurrentStdout()
    logging.basicConfig(format=FAIRSEQ_LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S", level=level, stream=stream)
