"""Shared fixtures: tiny corpora, the Tatoeba path, the venv's console commands."""

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: fairseq-* and b2t-* live here
SHARED = Path(os.environ.get("B2T_SHARED", REPO.parent / "shared"))
TATOEBA_ZIP = Path(os.environ.get("B2T_TATOEBA_ZIP", SHARED / "data/tatoeba-deu-eng-2018-05-13/deu-eng.zip"))

torch.set_num_threads(1)  # 2 cores: keep tests from oversubscribing them

_EN = "the a cat dog house tree red blue big small runs sees eats".split()
_DE = dict(zip(_EN, "der ein katze hund haus baum rot blau gross klein rennt sieht isst".split()))


def write_toy_corpus(folder, sizes=(("train", 400), ("valid", 40), ("test", 40)), seed=0):
    """A word-for-word toy En-De corpus: learnable in a few updates."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes:
        with open(folder / f"{split}.en", "w") as fe, open(folder / f"{split}.de", "w") as fd:
            for _ in range(n):
                s = [rng.choice(_EN) for _ in range(rng.randint(3, 8))]
                fe.write(" ".join(s) + "\n")
                fd.write(" ".join(_DE[w] for w in s) + "\n")
    return folder


def run(cmd, check=True, **kw):
    """Run a command; on failure show its output in the assertion."""
    cmd = [str(c) for c in cmd]
    if not os.path.isabs(cmd[0]) and (BIN / cmd[0]).exists():
        cmd[0] = str(BIN / cmd[0])
    env = dict(os.environ, OMP_NUM_THREADS="1", **kw.pop("env", {}))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}")
    return p


@pytest.fixture(scope="session")
def toy_data_bin(tmp_path_factory):
    """A binarized toy corpus with a joined dictionary (for --share-all-embeddings)."""
    root = tmp_path_factory.mktemp("toy")
    raw = write_toy_corpus(root / "raw")
    run(["fairseq-preprocess", "--source-lang", "en", "--target-lang", "de",
         "--trainpref", raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test",
         "--destdir", root / "bin", "--joined-dictionary", "--workers", "1"])
    return root / "bin"


@pytest.fixture(scope="session")
def tatoeba_zip():
    if not TATOEBA_ZIP.exists():
        pytest.skip(f"Tatoeba corpus not found at {TATOEBA_ZIP} (set B2T_TATOEBA_ZIP)")
    return TATOEBA_ZIP


@pytest.fixture
def fresh_copy(tmp_path):
    def _copy(src):
        dst = tmp_path / Path(src).name
        shutil.copytree(src, dst)
        return dst
    return _copy
