"""pytest fixtures only; shared helpers are in helpers.py."""

import shutil
from pathlib import Path

import pytest
from helpers import TATOEBA_ZIP, run, to_omegaconf, write_toy_corpus, write_toy_dictionaries


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
def toy_dicts(tmp_path_factory):
    """A folder with only the toy corpus's joined dictionary: enough to build any model, in-process."""
    return write_toy_dictionaries(tmp_path_factory.mktemp("toy_dicts"))


@pytest.fixture(scope="session")
def lm_dict_dir(tmp_path_factory):
    """A folder with only dict.txt: enough for fairseq's language_modeling task to build a model in-process."""
    d = tmp_path_factory.mktemp("lmdict")
    (d / "dict.txt").write_text("".join(f"w{i} {100 - i}\n" for i in range(40)))
    return d


@pytest.fixture
def compose_once(monkeypatch):
    """fairseq's convert_namespace_to_omegaconf as helpers.to_omegaconf (Hydra composes each distinct args
    once, then a copy), for tests that build many trainers through code that looks it up at call time."""
    import fairseq.dataclass.utils

    monkeypatch.setattr(fairseq.dataclass.utils, "convert_namespace_to_omegaconf", to_omegaconf)


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


# End-to-end tests (tests/e2e/, and any test that needs a binarized corpus or is marked slow) run
# fairseq commands or training in subprocesses (minutes); unit tests run in-process in seconds:
# `pytest -m "not e2e"` runs the unit tests alone (under a minute, on two cores).
E2E_FIXTURES = {"toy_data_bin", "tatoeba_zip", "demo_data"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        in_e2e_folder = "e2e" in Path(str(item.fspath)).relative_to(Path(__file__).parent).parts
        if in_e2e_folder or E2E_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.e2e)
