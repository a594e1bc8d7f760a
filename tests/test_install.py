"""Installing into an environment that already has fairseq: setup.py must not bring a second fairseq,
and an environment without fairseq gets one line at import."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _setup_kwargs():
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {k.arg: k.value for k in call.keywords}


def test_setup_requires_no_fairseq_and_no_torch():
    """A hard fairseq-fixed requirement installed it over upstream fairseq (two owners of fairseq/, pip exit 0)."""
    kw = _setup_kwargs()
    reqs = [ast.literal_eval(e) for e in kw["install_requires"].elts]
    names = {r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for r in reqs}
    assert not names & {"fairseq", "fairseq-fixed", "torch", "torchaudio"}, names
    extras = ast.literal_eval(kw["extras_require"])
    assert any(r.startswith("fairseq-fixed") for r in extras["fixed"])
    # upstream fairseq 0.12.2 runs on Python 3.8-3.10: the package must accept them
    assert ast.literal_eval(kw["python_requires"]) == ">=3.8"
    assert "b2t-export = b2t_tools.commands.export:main" in ast.literal_eval(kw["entry_points"])["console_scripts"]


def test_import_without_fairseq_is_one_line():
    hide = ("import sys, importlib.abc\n"
            "class NoFairseq(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'fairseq' or name.startswith('fairseq.'):\n"
            "            raise ModuleNotFoundError(\"No module named 'fairseq'\")\n"
            "sys.meta_path.insert(0, NoFairseq())\n"
            "try:\n"
            "    import b2t_fairseq\n"
            "except ImportError as e:\n"
            "    print(type(e).__name__, '|', e)\n")
    p = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout
    assert lines[0].startswith("FairseqMissing | b2t_fairseq needs fairseq"), lines[0]
    assert "pip install 'b2t-fairseq[fixed]'" in lines[0] and "fairseq==0.12.2" in lines[0]


def test_setup_env_refuses_an_old_python_in_one_line(tmp_path):
    fake = tmp_path / "python3.9"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = -V ]; then echo 'Python 3.9.18'; exit 0; fi\nexit 1\n")
    fake.chmod(0o755)
    p = subprocess.run(["bash", str(REPO / "scripts/setup-env.sh"), str(tmp_path / "venv")], capture_output=True,
                       text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake)})
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("setup-env.sh: error: Python 3.9.18 is older"), p.stderr
    assert not (tmp_path / "venv").exists()  # refused before anything was made


def test_export_refuses_bad_input_in_one_line(tmp_path):
    from helpers import assert_one_line_error, run

    for argv, fragment in ((["/nonexistent.pt", tmp_path / "o.pt"], "does not exist"),
                           ([tmp_path / "same.pt", tmp_path / "same.pt"], "would overwrite the plugin checkpoint")):
        (tmp_path / "same.pt").write_bytes(b"x")
        p = run([sys.executable, "-m", "b2t_tools.commands.export", *argv], check=False, cwd=REPO)
        assert p.returncode == 2
        assert_one_line_error(p.stderr, "b2t-export", fragment)
        assert not (tmp_path / "o.pt").exists()
