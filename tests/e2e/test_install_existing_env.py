"""The README's route into an environment that already has fairseq and torch: `pip install --no-deps -e .`
installs the plugin and its commands, and leaves that fairseq the one that is imported (no second
distribution owning fairseq/ on top of it)."""

import site
import subprocess
import sys
import venv

from helpers import REPO


def test_no_deps_install_into_an_existing_fairseq_environment(tmp_path):
    env_dir = tmp_path / "existing"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    own_site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    # "the user's environment": it sees this test's fairseq, torch and setuptools, and nothing of the plugin
    theirs = [p for p in site.getsitepackages() if p != own_site]
    (env_dir / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
     / "existing.pth").write_text("\n".join(theirs) + "\n")
    before = subprocess.run([str(py), "-c", "import fairseq; print(fairseq.__file__)"],
                            capture_output=True, text=True, check=True).stdout.strip()

    p = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "-e", str(REPO)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]

    after = subprocess.run([str(py), "-c", "import fairseq, b2t_fairseq; print(fairseq.__file__)"],
                           capture_output=True, text=True)
    assert after.returncode == 0, after.stderr[-3000:]
    assert after.stdout.strip() == before  # the environment's own fairseq, not a new one
    owners = subprocess.run([str(py), "-m", "pip", "list", "--format", "freeze", "--path", own_site],
                            capture_output=True, text=True, check=True).stdout.lower()
    assert "b2t-fairseq" in owners and "fairseq-fixed" not in owners and "torch" not in owners, owners
    help_ = subprocess.run([str(env_dir / "bin" / "b2t-export"), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "b2t-export" in help_.stdout, help_.stderr[-2000:]
