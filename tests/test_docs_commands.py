"""Every command shown in README.md and docs/*.md exists and takes the flags shown on it.

A command is a line of a fenced code block (in a ``console`` block: a ``$ `` prompt line) that starts with
b2t-*, fairseq-*, ``python -m b2t_tools...``, ``bash scripts/...``, ``scripts/...`` or ``make``. Its program
must exist (a console script of setup.py or of fairseq, a file in scripts/, an importable module, a
Makefile target) and every ``--flag`` on it must be one that program's parser accepts. Parsers are built in
this process, nothing is run: fairseq's own (with the plugin imported, and the line's --arch, --task,
--optimizer, ... adding their flags as fairseq's parse_args_and_arch does), ours caught from the module's
own parse function, a shell script's from the module it execs or its ``case`` labels.
"""

import argparse
import importlib
import importlib.metadata
import importlib.util
import re
import shlex
from functools import lru_cache
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^\s*(```|~~~)\s*(\S*)")
OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "(", ")"}
# fairseq's parser factory for each command (fairseq.options); b2t-X is fairseq-X with the plugin
FAIRSEQ = {"train": "get_training_parser", "generate": "get_generation_parser",
           "interactive": "get_interactive_generation_parser", "validate": "get_validation_parser",
           "eval-lm": "get_eval_lm_parser", "preprocess": "get_preprocessing_parser",
           "torchrun-train": "get_training_parser"}
HYDRA_FLAGS = {"--config-dir", "--config-name", "--config-path", "--help", "--multirun", "--cfg", "--info"}


def commands(text):
    """(line number, tokens) of each command in the fenced code blocks of a markdown text."""
    out, block, lang, held = [], False, "", None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            block, lang, held = not block, m.group(2), None
            continue
        if not block:
            continue
        s = line.strip()
        if held is not None:  # a continued line (trailing backslash)
            start, s = held[0], held[1] + " " + s
        elif lang == "console":
            if not s.startswith("$ "):
                continue
            start, s = n, s[2:]
        else:
            start = n
        if s.endswith("\\"):
            held = (start, s[:-1])
            continue
        held = None
        for tokens in _segments(s):
            if _program(tokens):
                out.append((start, tokens))
    return out


def _segments(s):
    lexer = shlex.shlex(s, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: prose in a code block, not a command
        return []
    seg = []
    for t in tokens + [";"]:
        if t in OPERATORS or set(t) <= set("|&;<>()"):
            while seg and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", seg[0]):  # VAR=value before the program
                seg.pop(0)
            if seg:
                yield seg
            seg = []
        else:
            seg.append(t)


def _program(tokens):
    """The program a command runs, as ('kind', name), or None for a line that is not one of ours."""
    t = tokens[0]
    if t in ("bash", "sh") and len(tokens) > 1 and tokens[1].startswith("scripts/"):
        return ("script", tokens[1])
    if t.startswith("scripts/") and not t.endswith("/"):
        return ("script", t)
    if t in ("python", "python3") and len(tokens) > 2 and tokens[1] == "-m" and tokens[2].startswith("b2t_tools"):
        return ("module", tokens[2])
    if t == "make":
        return ("make", t)
    if re.fullmatch(r"(b2t|fairseq)-[a-z0-9-]+", t):
        return ("console", t)
    return None


def _args(tokens):
    kind, _ = _program(tokens)
    skip = {"script": 2 if tokens[0] in ("bash", "sh") else 1, "module": 3}.get(kind, 1)
    return tokens[skip:]


def _flag_value(args, *flags):
    for i, a in enumerate(args):
        for f in flags:
            if a == f and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(f + "="):
                return a.split("=", 1)[1]
    return None


@lru_cache(None)
def console_scripts():
    """Our console scripts (setup.py) as {name: module}, and fairseq's names."""
    ours = dict(re.findall(r'"(b2t-[\w-]+) = ([\w.]+):\w+"', (ROOT / "setup.py").read_text()))
    theirs = {e.name for e in importlib.metadata.entry_points(group="console_scripts") if e.name.startswith("fairseq-")}
    return ours, theirs


@lru_cache(None)
def make_targets():
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


class _Caught(BaseException):  # not an Exception: run_command must let it through
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


@lru_cache(None)
def module_parser(name):
    """The argparse parser a module of ours builds, caught at its first parse (nothing runs after it)."""
    module = importlib.import_module(name)
    if hasattr(module, "get_parser"):
        return module.get_parser()

    def catch(self, *a, **k):
        raise _Caught(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", catch), \
            mock.patch.object(argparse.ArgumentParser, "parse_args", catch):
        for fn in ("parse_args", "run", "main"):
            if callable(getattr(module, fn, None)):
                try:
                    getattr(module, fn)([])
                except _Caught as c:
                    return c.parser
                except TypeError:
                    continue
    return None


def fairseq_parser(command, args):
    """fairseq's parser for ``command`` with the flags of the line's --arch, --task and registry choices."""
    import b2t_fairseq  # noqa: F401  registers the plugin's models, as --user-dir does
    from fairseq import options
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY
    from fairseq.registry import REGISTRIES
    from fairseq.tasks import TASK_REGISTRY

    parser = getattr(options, FAIRSEQ[command])()
    choosers = ["--arch", "-a", "--task"] + ["--" + r.replace("_", "-") for r in REGISTRIES]
    probe = []
    for f in choosers:
        v = _flag_value(args, f)
        if v is not None:
            probe += [f, v]

    def error(message):
        raise ValueError(message.split(" (choose from")[0])  # not every registered architecture

    parser.error = error
    chosen, _ = parser.parse_known_args(probe)
    arch = getattr(chosen, "arch", None)
    if arch:
        group = parser.add_argument_group("model", argument_default=argparse.SUPPRESS)
        (ARCH_MODEL_REGISTRY.get(arch) or MODEL_REGISTRY[arch]).add_args(group)
    if getattr(chosen, "task", None):
        TASK_REGISTRY[chosen.task].add_args(parser)
    for name, reg in REGISTRIES.items():
        choice = getattr(chosen, name, None)
        if choice is not None:
            cls = reg["registry"][choice]
            if hasattr(cls, "add_args"):
                cls.add_args(parser)
            elif hasattr(cls, "__dataclass"):
                options.gen_parser_from_dataclass(parser, cls.__dataclass())
    return parser


def script_flags(path):
    """A shell script's flags: the module it execs with "$@", the script it passes "$@" on to, or its case labels."""
    text = path.read_text()
    m = re.search(r'-m ([\w.]+) "\$@"', text)
    if m:
        return set(module_parser(m.group(1))._option_string_actions)
    m = re.search(r'"\$HERE/([\w.-]+\.sh)"[^\n]*"\$@"', text)
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    labels = re.findall(r"^\s*((?:--[a-z][\w-]*\|)*--[a-z][\w-]*)\)", code, re.M)  # case labels
    own = {f for label in labels for f in label.split("|")} | set(re.findall(r"== (--[a-z][\w-]*)", code))
    return own | (script_flags(path.parent / m.group(1)) if m else set())


def check(tokens):
    """The problems of one command, as short strings (empty: the command is valid)."""
    kind, name = _program(tokens)
    args = _args(tokens)
    if "--" in args:  # what follows goes to another program unchecked (train.sh -- fairseq flags)
        args = args[:args.index("--")]
    flags = [a.split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2]
    accepted = None
    if kind == "make":
        return [f"make: no target {t!r} in the Makefile" for t in args
                if "=" not in t and not t.startswith("-") and t not in make_targets()]
    if kind == "script":
        path = ROOT / name
        if not path.is_file():
            return [f"{name}: no such script"]
        accepted = script_flags(path)
    elif kind == "module":
        if importlib.util.find_spec(name) is None:
            return [f"python -m {name}: no such module"]
        if name == "b2t_tools.commands.cli" and args and args[0] in FAIRSEQ:
            return _check_fairseq(name, args[0], args[1:], flags)
        parser = module_parser(name) if flags else None
        if flags and parser is None:
            return [f"python -m {name}: no argparse parser found to check {', '.join(flags)}"]
        accepted = set(parser._option_string_actions) if parser else set()
    else:
        ours, theirs = console_scripts()
        if name not in ours and name not in theirs:
            return [f"{name}: not a console script of setup.py or fairseq"]
        command = name.split("-", 1)[1]
        if command == "hydra-train":
            return _check_hydra(name, args, flags)
        if command in FAIRSEQ:
            return _check_fairseq(name, command, args, flags)
        parser = module_parser(ours[name])
        if parser is None:
            return [f"{name}: no argparse parser found in {ours[name]}"]
        accepted = set(parser._option_string_actions)
    return [f"{name}: {f} is not one of its flags" for f in flags if f not in accepted]


def _check_fairseq(name, command, args, flags):
    if name.startswith("b2t-") and command in ("train", "torchrun-train"):
        from b2t_fairseq.fast import translate_argv
        from b2t_tools.commands import authors_argv
        from b2t_tools.errors import ToolError

        try:  # the authors' train.py flags, as b2t-train translates them
            args = translate_argv(authors_argv.translate(list(args)))
        except ToolError as e:
            return [f"{name}: refused: {e}"]
        flags = [a.split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2]
    try:
        parser = fairseq_parser(command, args)
    except (ValueError, KeyError) as e:
        return [f"{name}: {e}"]
    return [f"{name}: {f} is not one of its flags" for f in flags if f not in parser._option_string_actions]


def _check_hydra(name, args, flags):
    problems = [f"{name}: {f} is not a Hydra flag" for f in flags if f not in HYDRA_FLAGS]
    folder, config = _flag_value(args, "--config-dir"), _flag_value(args, "--config-name")
    if folder and config and not (ROOT / folder / f"{config}.yaml").is_file():
        problems.append(f"{name}: no config {folder}/{config}.yaml")
    from fairseq.dataclass.configs import FairseqConfig

    groups = set(FairseqConfig.__dataclass_fields__)
    for a in args:  # overrides: key=value, +key=value; the key's first part is one of fairseq's groups
        m = re.match(r"^\+{0,2}([A-Za-z_]\w*)(?:\.[\w.]+)?=", a)
        if m and m.group(1) not in groups:
            problems.append(f"{name}: {a.split('=')[0]} is not in fairseq's config ({m.group(1)} is no group of it)")
    return problems


def problems_in(text, label):
    return [f"{label}:{n}: {p}" for n, tokens in commands(text) for p in check(tokens)]


# --- the checker can fail ------------------------------------------------------------------------

@pytest.mark.parametrize("line, wanted", [
    ("b2t-train DATA --arch transformer_b2t --word-dropout-src 0.1 --made-up-flag 1", "--made-up-flag"),
    ("b2t-frobnicate --help", "not a console script"),
    ("b2t-train D --arch transformer_b2t_99l --max-tokens 4096", "invalid choice: 'transformer_b2t_99l'"),
    ("make frobnicate", "no target 'frobnicate'"),
    ("scripts/nope.sh --x", "no such script"),
    ("python -m b2t_tools.nope --x", "no such module"),
    ("scripts/evaluate.sh SAVE --bogus", "--bogus"),
    ("scripts/train.sh transformer_b2t 18 --gpus 8 --made-up 3", "--made-up"),
    ("b2t-lm-train data --arch transformer_lm_b2t --layers 16 --gpu 2", "--gpu"),
    ("b2t-hydra-train --config-dir configs --config-name transformer_b2t_99l task.data=D", "no config"),
    ("b2t-hydra-train --config-dir configs --config-name transformer_b2t_18l tsk.data=D", "tsk.data"),
    ("fairseq-train D --user-dir b2t_fairseq --arch transformer_b2t --optimizer adam --adam-betx 1", "--adam-betx"),
])
def test_a_bad_command_is_caught(line, wanted):
    problems = problems_in(f"```bash\n{line}\n```\n", "x.md")
    assert len(problems) == 1 and wanted in problems[0], problems


def test_good_commands_pass_and_only_code_blocks_count():
    text = ("b2t-train --not-in-a-block\n```console\n$ scripts/train.sh transformer_b2t 18 --gpus 8 --dry-run\n"
            "b2t-train output line --not-a-command\n```\n```bash\nb2t-train DATA --arch transformer_b2t_18l \\\n"
            "    --optimizer adam --adam-betas '(0.9, 0.98)' --ln-position b2t --log-layer-norms   # a comment --x\n"
            "make demo && make test PYTEST_ARGS=-x\nB2T_TATOEBA_ZIP=z.zip b2t-demo --quick\n```\n")
    found = commands(text)
    assert [t[0] for _, t in found] == ["scripts/train.sh", "b2t-train", "make", "make", "b2t-demo"]
    assert problems_in(text, "x.md") == []


# --- the documents ---------------------------------------------------------------------------------

def test_every_documented_command_is_valid():
    problems, count = [], 0
    for path in DOCS:
        text = path.read_text()
        count += len(commands(text))
        problems += problems_in(text, path.relative_to(ROOT))
    assert count >= 40, f"only {count} commands found: is the extraction broken?"
    assert problems == []


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", DOCS + [ROOT / "CHANGELOG.md", ROOT / "results" / "README.md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    if not path.exists():
        pytest.skip(f"{path.name} not written yet")
    broken = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"^(https?:|mailto:)", target):
            continue
        file, _, anchor = target.partition("#")
        page = path.parent / file if file else path
        if not page.exists() or (anchor and page.suffix == ".md" and anchor not in anchors(page)):
            broken.append(target)
    assert broken == []


def anchors(page):
    """GitHub's anchors of a markdown page's headings (outside code blocks)."""
    out, block = set(), False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            block = not block
        elif not block and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_anchors_follow_github():
    page = ROOT / "docs" / "benchmark.md"
    assert "fast-path---b2t-fast" in anchors(page) and "benchmark-and-fast-path" in anchors(page)


def test_results_readme_indexes_every_committed_result():
    """Each file committed under results/ is named in results/README.md (its stem, or its folder)."""
    import subprocess

    try:
        files = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    index = (ROOT / "results" / "README.md").read_text()
    missing = []
    for f in files:
        parts = Path(f).parts[1:]
        if parts == ("README.md",):
            continue
        name = parts[0] + "/" if len(parts) > 1 else Path(parts[0]).stem
        if name not in index:
            missing.append(f)
    assert missing == []
