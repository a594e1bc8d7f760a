"""End to end through the real command line: train, resume, generate, interactive, validate, from_pretrained."""

import shutil
import sys

import pytest
import torch
from helpers import REPO, run, train_args, train_losses

ARCHS = ["transformer_post_ln_tiny", "transformer_pre_ln_tiny", "transformer_b2t_tiny"]


@pytest.fixture(scope="module")
def trained(toy_data_bin, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    runs = {}
    for arch in ARCHS:
        p = run(["b2t-train", *train_args(toy_data_bin, root / arch, arch)])
        runs[arch] = (root / arch, train_losses(p.stdout + p.stderr))
    return runs


@pytest.mark.parametrize("arch", ARCHS)
def test_train_learns_and_generate_decodes(toy_data_bin, trained, arch):
    save_dir, losses = trained[arch]
    assert max(losses) == 30 and losses[30] < losses[1] - 1.0, losses
    p = run(["b2t-generate", toy_data_bin, "--path", save_dir / "checkpoint_last.pt", "--beam", "4",
             "--batch-size", "16", "--cpu"])
    assert sum(line.startswith("H-") for line in p.stdout.splitlines()) == 40
    assert "Generate test with beam=4: BLEU4 =" in p.stdout + p.stderr


def test_interactive_and_validate(toy_data_bin, trained):
    save_dir, _ = trained["transformer_b2t_tiny"]
    p = run(["b2t-interactive", toy_data_bin, "--path", save_dir / "checkpoint_last.pt", "--beam", "2", "--cpu",
             "--source-lang", "en", "--target-lang", "de"], input="the cat runs\nthe big dog\n")
    assert sum(line.startswith("H-") for line in p.stdout.splitlines()) == 2
    p = run(["b2t-validate", toy_data_bin, "--path", save_dir / "checkpoint_last.pt", "--valid-subset", "valid",
             "--task", "translation", "--cpu", "--max-tokens", "1000"])
    assert "valid on 'valid' subset" in p.stdout + p.stderr


def test_from_pretrained_translates(toy_data_bin, trained):
    from fairseq.models.transformer import TransformerModel

    import b2t_fairseq  # noqa: F401

    save_dir, _ = trained["transformer_b2t_tiny"]
    hub = TransformerModel.from_pretrained(str(save_dir), checkpoint_file="checkpoint_last.pt",
                                           data_name_or_path=str(toy_data_bin), source_lang="en", target_lang="de")
    assert type(hub.models[0]).__name__ == "TransformerB2TModel"
    assert hub.models[0].cfg.ln_position == "b2t"
    out = hub.translate("the cat runs", beam=2)
    assert isinstance(out, str) and len(out.split()) >= 1


def test_resume_continues_from_checkpoint_last(toy_data_bin, trained, tmp_path):
    src, _ = trained["transformer_pre_ln_tiny"]
    save_dir = tmp_path / "resume"
    shutil.copytree(src, save_dir)
    p = run(["b2t-train", *train_args(toy_data_bin, save_dir, "transformer_pre_ln_tiny", 36)])
    log = p.stdout + p.stderr
    assert "Loaded checkpoint" in log and "(epoch" in log
    losses = train_losses(log)
    assert min(losses) == 31 and max(losses) == 36  # picked up at update 31, not from scratch


def test_checkpoint_activations_give_the_same_training(toy_data_bin, trained, tmp_path):
    _, plain = trained["transformer_b2t_tiny"]
    p = run(["b2t-train", *train_args(toy_data_bin, tmp_path / "ckpt-act", "transformer_b2t_tiny", 5,
                                      "--checkpoint-activations")])
    with_ckpt = train_losses(p.stdout + p.stderr)
    assert [with_ckpt[u] for u in range(1, 6)] == [plain[u] for u in range(1, 6)]


def test_plain_fairseq_train_with_user_dir(toy_data_bin, tmp_path):
    p = run(["fairseq-train", "--user-dir", REPO / "b2t_fairseq",
             *train_args(toy_data_bin, tmp_path / "plain", "transformer_b2t_tiny", 2)])
    assert train_losses(p.stdout + p.stderr).keys() == {1, 2}


def test_user_dir_pointing_at_another_copy_next_to_the_installed_one(toy_data_bin, tmp_path):
    copy = tmp_path / "elsewhere" / "b2t_fairseq"
    shutil.copytree(REPO / "b2t_fairseq", copy, ignore=shutil.ignore_patterns("__pycache__"))
    p = run(["fairseq-train", "--user-dir", copy, *train_args(toy_data_bin, tmp_path / "a", "transformer_b2t_tiny", 1)])
    assert 1 in train_losses(p.stdout + p.stderr)
    p = run(["b2t-train", "--user-dir", copy, *train_args(toy_data_bin, tmp_path / "b", "transformer_b2t_tiny", 1)])
    assert "using the installed plugin" in p.stderr and 1 in train_losses(p.stdout + p.stderr)


@pytest.mark.e2e
def test_importing_the_plugin_twice(tmp_path):
    copy = tmp_path / "second" / "b2t_fairseq"
    shutil.copytree(REPO / "b2t_fairseq", copy, ignore=shutil.ignore_patterns("__pycache__"))
    code = f"""
import importlib, importlib.util, sys
import b2t_fairseq
importlib.reload(b2t_fairseq)
spec = importlib.util.spec_from_file_location("b2t_fairseq_copy", r"{copy / '__init__.py'}",
                                              submodule_search_locations=[r"{copy}"])
mod = importlib.util.module_from_spec(spec); sys.modules["b2t_fairseq_copy"] = mod; spec.loader.exec_module(mod)
from fairseq.models import ARCH_MODEL_REGISTRY
print(sorted(a for a in ARCH_MODEL_REGISTRY if a.startswith(("transformer_b2t", "transformer_post_ln", "transformer_pre_ln"))))
"""
    p = run([sys.executable, "-c", code])
    assert p.stdout.count("transformer_") == 9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_training_on_gpu(toy_data_bin, tmp_path, arch):
    args = [a for a in train_args(toy_data_bin, tmp_path / arch, arch, 20) if a != "--cpu"]
    p = run(["b2t-train", *args, "--fp16"])
    losses = train_losses(p.stdout + p.stderr)
    assert max(losses) == 20 and all(v == v for v in losses.values()) and losses[20] < losses[1]


def test_checkpoints_load_under_weights_only_torch_once_the_plugin_is_imported(trained):
    ckpt = trained["transformer_b2t_tiny"][0] / "checkpoint_last.pt"
    load = f"import torch; s = torch.load(r'{ckpt}', map_location='cpu'); print(sorted(s)[:3])"
    bare = run([sys.executable, "-c", load], check=False)
    assert bare.returncode != 0 and "weights_only" in bare.stderr  # torch >= 2.6 refuses fairseq checkpoints
    fixed = run([sys.executable, "-c", "import b2t_fairseq; " + load])
    assert "cfg" in fixed.stdout or "args" in fixed.stdout
