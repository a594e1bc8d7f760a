"""The plugin stands apart from its tools: importing the plugin loads no tool, and the text-only tools
(the WMT prepare's text stages, the results table) run without torch or fairseq."""

import json
import subprocess
import sys

import pytest

from b2t_tools.wmt import fake, prepare

CHECK = r'''
import json, sys
from b2t_tools.wmt import prepare, results_table
codes = {"prepare": prepare.main(sys.argv[2:]), "results_table": results_table.main([sys.argv[1]])}
heavy = sorted(m for m in ("torch", "fairseq", "b2t_fairseq") if m in sys.modules)
print(json.dumps({"codes": codes, "heavy": heavy}))
'''


@pytest.mark.slow  # a child process or a whole pipeline: e2e
def test_importing_the_plugin_loads_no_tool():
    code = "import sys, b2t_fairseq; print(sorted(m for m in sys.modules if m.split('.')[0] == 'b2t_tools'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow  # the whole prepare in a child process: e2e
def test_text_only_commands_run_without_torch(tmp_path):
    files = fake.write_archives(tmp_path / "mirror", train=(60, 20, 20), test_size=4)
    sums = tmp_path / "sums.md5"
    sums.write_text(f"{prepare.md5sum(files['test.tgz'])}  test.tgz\n")
    # every stage up to BPE runs in this process; binarizing runs fairseq-preprocess as a child process
    argv = ["--mirror", f"file://{tmp_path / 'mirror'}", "--sums", str(sums), "--work", str(tmp_path / "work"),
            "--dest", str(tmp_path / "bin"), "--workers", "1", "--bpe-merges", "20", "--nwords", "24"]
    (tmp_path / "results").mkdir()
    p = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path / "results"), *argv], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["codes"]["prepare"] == 0, p.stderr[-3000:]
    assert report["codes"]["results_table"] in (0, 2)  # an empty results folder is a one-line error
    assert report["heavy"] == [], report
    assert (tmp_path / "work/google/train.tok.clean.bpe.20.en").is_file()
    assert (tmp_path / "bin/dict.en.txt").is_file()
