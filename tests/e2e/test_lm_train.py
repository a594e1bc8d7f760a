"""fairseq's own language modelling through the plugin's commands, on numpy 2: b2t-train --task
language_modeling with every --sample-break-mode on a freshly binarized corpus, b2t-eval-lm and
fairseq-eval-lm with --context-window, and translation with --num-batch-buckets (the numpy repair)."""

import json
import math
import random

import numpy
import pytest
from helpers import REPO, assert_one_line_error, run, toy_train_argv, train_losses

_WORDS = "the a cat dog house tree red blue big small runs sees eats and with on".split()


@pytest.fixture(scope="module")
def lm_data_bin(tmp_path_factory):
    """A tiny English corpus in documents (blank lines between them), binarized with --only-source."""
    root = tmp_path_factory.mktemp("lm")
    rng = random.Random(0)
    for split, docs in (("train", 40), ("valid", 4), ("test", 4)):
        with open(root / f"{split}.txt", "w") as f:
            for _ in range(docs):
                for _ in range(rng.randint(2, 5)):
                    f.write(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) + "\n")
                f.write("\n")
    run(["fairseq-preprocess", "--only-source", "--trainpref", root / "train.txt", "--validpref",
         root / "valid.txt", "--testpref", root / "test.txt", "--destdir", root / "bin", "--workers", "1"])
    return root / "bin"


def lm_argv(data, *extra, arch="transformer_lm_b2t_tiny"):
    return [data, "--task", "language_modeling", "--arch", arch, "--optimizer", "adam", "--lr", "0.002",
            "--tokens-per-sample", "32", "--max-tokens", "256", "--seed", "1", "--num-workers", "0",
            "--no-progress-bar", "--cpu", "--log-format", "json", "--log-interval", "1", *extra]


def test_token_blocks_with_eos_breaks_build_on_numpy_2():
    # fairseq's TokenBlockDataset, in-process: --sample-break-mode eos is where it uses np.compat.long
    import torch
    from fairseq.data import TokenBlockDataset

    import b2t_fairseq  # noqa: F401  (the plugin, as every b2t command and --user-dir loads it)

    docs = [torch.tensor([5, 6, 2]), torch.tensor([7, 2]), torch.tensor([5, 5, 5, 2])]
    ds = TokenBlockDataset(docs, numpy.array([len(d) for d in docs]), 8, pad=1, eos=2, break_mode="eos")
    assert [ds[i].tolist() for i in range(len(ds))] == [d.tolist() for d in docs]


def test_numpy_is_2_here():
    # the repair under test only matters on numpy 2; the project pins it (scripts/setup-env.sh)
    assert int(numpy.__version__.split(".")[0]) >= 2 and not hasattr(numpy, "compat")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "complete", "complete_doc", "eos"])
def test_language_modeling_trains_with_every_sample_break_mode(lm_data_bin, tmp_path, mode):
    p = run(["b2t-train", *lm_argv(lm_data_bin, "--sample-break-mode", mode, "--max-update", "3", "--no-save")])
    losses = train_losses(p.stdout + p.stderr)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())


@pytest.mark.slow
def test_lm_trains_and_evaluates_with_both_commands(lm_data_bin, tmp_path):
    save = tmp_path / "ckpt"
    run(["b2t-train", *lm_argv(lm_data_bin, "--sample-break-mode", "none", "--max-update", "20", "--save-dir", save,
                               "--no-epoch-checkpoints")])
    ckpt = save / "checkpoint_last.pt"
    assert ckpt.exists()
    ppl = {}
    for cmd in (["b2t-eval-lm"], ["fairseq-eval-lm", "--user-dir", REPO / "b2t_fairseq"]):
        p = run([*cmd, lm_data_bin, "--path", ckpt, "--cpu", "--batch-size", "2", "--tokens-per-sample", "32",
                 "--context-window", "24", "--gen-subset", "test", "--num-workers", "0"])
        line = [ln for ln in (p.stdout + p.stderr).splitlines() if "Perplexity:" in ln][-1]
        ppl[cmd[0]] = float(line.rsplit("Perplexity:", 1)[1].split()[0].strip(","))
    # both load the checkpoint as B2T (not stock Post-LN) and so agree; the model learned something
    assert ppl["b2t-eval-lm"] == ppl["fairseq-eval-lm"]
    assert math.isfinite(ppl["b2t-eval-lm"]) and ppl["b2t-eval-lm"] < 21  # the vocabulary: 16 words + specials
    # b2t-grad-norms (and the demo's trained panel) on the trained decoder-only checkpoint
    from b2t_tools.analysis import grad_norms

    res = grad_norms.run_models(lm_data_bin, [("b2t", None, ckpt)], k=1, max_tokens=128)["b2t"]
    assert res["ln_position"] == "b2t" and res["layers"] == {"decoder": 2} and "encoder" not in res


def test_translation_with_batch_buckets_trains(toy_data_bin):
    # LanguagePairDataset's bucketing is where fairseq uses np.compat.long
    p = run(["b2t-train", toy_data_bin, *toy_train_argv("--num-batch-buckets", "4", "--max-update", "2", "--no-save")])
    assert sorted(train_losses(p.stdout + p.stderr)) == [1, 2]


@pytest.mark.slow
def test_lm_bad_input_is_one_line(lm_data_bin, tmp_path):
    p = run(["b2t-train", *lm_argv(lm_data_bin, "--decoder-normalize-before", "--max-update", "1", "--no-save")],
            check=False)
    assert p.returncode == 2
    assert_one_line_error(p.stderr, "b2t-train", "B2T cannot be combined", "--ln-position pre")
    p = run(["b2t-eval-lm", lm_data_bin, "--path", tmp_path / "missing.pt", "--cpu"], check=False)
    assert p.returncode == 2
    assert_one_line_error(p.stderr, "b2t-eval-lm", "not found")


@pytest.mark.slow
def test_grad_norms_measure_decoder_only_models(lm_data_bin, tmp_path, capsys):
    from b2t_tools.analysis import grad_norms

    out = tmp_path / "gn.json"
    assert grad_norms.main([str(lm_data_bin), "--arch", "post_ln", "--arch", "b2t", "--layers", "3", "--batches", "1",
                            "--max-tokens", "128", "--json", str(out), "--png", str(tmp_path / "gn.png")]) in (0, None)
    res = json.loads(out.read_text())
    assert set(res) == {"post_ln", "b2t"}
    for name, r in res.items():
        assert r["arch"] == f"transformer_lm_{name}_tiny" and r["layers"] == {"decoder": 3} and "encoder" not in r
        assert len(r["decoder"]) == 3 and all(math.isfinite(v) and v > 0 for v in r["decoder"])
    assert res["b2t"]["decoder"] != res["post_ln"]["decoder"]  # two different layer types were measured
    assert "encoder" not in capsys.readouterr().out


def test_grad_norms_on_an_authors_lm_checkpoint(lm_data_bin, tmp_path):
    """Their fork's transformer_lm (fairseq 0.9 args): its converted task asked for fairseq's plasma view."""
    from test_lm_authors import LAYERS, write_fork_lm

    from b2t_tools.analysis import grad_norms

    ckpt = tmp_path / "fork_lm.pt"
    write_fork_lm(ckpt, lm_data_bin)
    res = grad_norms.run_models(lm_data_bin, [("fork", None, ckpt)], k=1, max_tokens=128)["fork"]
    assert res["label"] == "B2T" and res["layers"] == {"decoder": LAYERS}
    assert len(res["decoder"]) == LAYERS and all(math.isfinite(v) and v > 0 for v in res["decoder"])
