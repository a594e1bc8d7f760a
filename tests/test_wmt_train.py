"""scripts/train.sh: effective batch arithmetic, launch commands, refusals (no training here)."""

import pytest
from helpers import REPO, run

from b2t_tools import launch
from b2t_tools.wmt import train as recipe

TRAIN_SH = REPO / "scripts" / "train.sh"


def dry(capsys, *argv):
    argv = [str(a) for a in argv]
    rc = recipe.main(argv[:2] + ["--dry-run"] + argv[2:])
    out = capsys.readouterr()
    return rc, out.out.strip(), out.err.strip()


@pytest.mark.e2e
def test_script_prints_update_freq_for_8_and_4_gpus():
    p8 = run(["bash", TRAIN_SH, "transformer_b2t", "18", "--gpus", "8", "--max-tokens", "3584", "--dry-run"])
    assert "--update-freq 16" in p8.stdout and "--arch transformer_b2t_18l" in p8.stdout
    p4 = run(["bash", TRAIN_SH, "transformer_b2t", "18", "--gpus", "4", "--max-tokens", "3584", "--dry-run"])
    assert "--update-freq 32" in p4.stdout


@pytest.mark.parametrize("gpus,nodes,max_tokens,freq", [(1, 1, 3584, 128), (8, 2, 3584, 8), (16, 1, 7168, 4),
                                                        (8, 4, 3584, 4), (2, 1, 4096, 56)])
def test_tokens_per_update_stay_458752(capsys, gpus, nodes, max_tokens, freq):
    rc, out, _ = dry(capsys, "transformer_pre_ln", 6, "--gpus", gpus, "--nodes", nodes, "--max-tokens", max_tokens)
    assert rc == 0 and f"--update-freq {freq} " in out
    assert gpus * nodes * max_tokens * freq == 458752


def test_uneven_split_is_refused_with_a_fix(capsys):
    rc, out, err = dry(capsys, "transformer_b2t", 6, "--gpus", 8, "--max-tokens", 4000)
    assert rc == 2 and not out
    assert err.startswith("train.sh: error: 458752 tokens per update cannot be split") and "--max-tokens 3584" in err
    rc, _, err = dry(capsys, "transformer_b2t", 6, "--gpus", 3)
    assert rc == 2 and "no --max-tokens fits 3 processes" in err


def test_paper_hyperparameters_per_depth(capsys):
    _, out6, _ = dry(capsys, "transformer_post_ln", 6, "--gpus", 8)
    _, out18, _ = dry(capsys, "transformer_b2t", 18, "--gpus", 8)
    for flag in ("--share-all-embeddings", "--clip-norm 0.1", "--lr 0.001", "--warmup-updates 4000",
                 "--warmup-init-lr 1e-07", "--label-smoothing 0.1", "--max-update 50000", "--keep-last-epochs 10",
                 "--seed 1", "--fp16", "--adam-betas '(0.9, 0.98)'", "--log-format json"):
        assert flag in out6 and flag in out18
    assert "--dropout 0.3" in out6 and "word-dropout" not in out6 and "--arch transformer_post_ln " in out6
    assert "--dropout 0.5 --word-dropout-src 0.1 --word-dropout-tgt 0.1" in out18
    assert "min-lr" not in out18


def test_launchers(capsys):
    _, spawn, _ = dry(capsys, "transformer_b2t", 6, "--gpus", 8)
    assert spawn.split()[0].endswith("b2t-train") and "--distributed-world-size 8" in spawn
    _, tr, _ = dry(capsys, "transformer_b2t", 6, "--gpus", 8, "--nodes", 2, "--node-rank", 1, "--master-addr", "h0")
    assert "torch.distributed.run --nnodes 2 --node_rank 1 --master_addr h0" in tr and "--nproc_per_node 8" in tr
    assert "--distributed-world-size 16" in tr and "env://" not in tr  # fairseq reads the torchrun env on GPUs
    _, slurm, _ = dry(capsys, "transformer_b2t", 6, "--gpus", 8, "--nodes", 4, "--launcher", "slurm")
    assert slurm.startswith("srun --nodes 4 --ntasks-per-node 8") and "--distributed-port 29500" in slurm
    _, cpu, _ = dry(capsys, "transformer_b2t", 6, "--gpus", 0, "--cpu-procs", 2, "--max-tokens", 512)
    for flag in ("--standalone", "--nproc_per_node 2", "-m b2t_tools.commands.torchrun_train", "--cpu",
                 "--distributed-world-size 2", "--distributed-init-method env://", "--distributed-no-spawn",
                 "--distributed-backend gloo", "--ddp-backend legacy_ddp", "--update-freq 448"):
        assert flag in cpu
    assert "--fp16" not in cpu
    _, extra, _ = dry(capsys, "transformer_b2t", 6, "--gpus", 1, "--tensorboard", "--", "--max-update", "10")
    assert extra.endswith("--max-update 10") and "--tensorboard-logdir" in extra


def test_gpu_count_from_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert launch.visible_gpus() == 4
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launch.visible_gpus() == 0


def test_missing_data_and_finished_run_are_refused(tmp_path, capsys, toy_data_bin):
    rc = recipe.main(["transformer_b2t", "6", "--gpus", "0", "--data", str(tmp_path / "nope")])
    assert rc == 2 and f"--data {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    save = tmp_path / "run"
    save.mkdir()
    (save / "DONE").write_text("x\n")
    (save / "checkpoint_last.pt").write_text("keep me\n")
    rc = recipe.main(["transformer_b2t", "6", "--gpus", "0", "--data", str(toy_data_bin), "--save-dir", str(save)])
    err = capsys.readouterr().err
    assert rc == 2 and "holds a finished run" in err and "--force" in err
    assert (save / "checkpoint_last.pt").read_text() == "keep me\n"


@pytest.mark.parametrize("arch,layers,ln,name", [("transformer_deepnorm", 18, "deepnorm", "transformer_deepnorm_18l"),
                                                 ("transformer_admin", 6, "admin", "transformer_admin"),
                                                 ("transformer_deepnorm", 12, "deepnorm", "transformer_deepnorm"),
                                                 ("transformer_admin", 18, "admin", "transformer_admin_18l")])
def test_deepnorm_and_admin_commands_parse_as_fairseq_would(capsys, arch, layers, ln, name):
    """The dry-run command of the two new layer types is a command b2t-train accepts, with the recipe by depth."""
    import shlex

    from fairseq import options

    import b2t_fairseq  # noqa: F401

    rc, out, _ = dry(capsys, arch, layers, "--gpus", 8)
    assert rc == 0 and f"--arch {name} " in out and "--update-freq 16" in out
    words = shlex.split(out)
    args = options.parse_args_and_arch(options.get_training_parser(), words[1:])
    assert args.arch == name and args.ln_position == ln
    assert args.encoder_layers == args.decoder_layers == layers
    assert args.dropout == (0.5 if layers >= 18 else 0.3)
    assert args.word_dropout_src == (0.1 if layers >= 18 else 0.0)
    assert args.lr == [0.001] and args.warmup_updates == 4000 and args.max_update == 50000


@pytest.mark.e2e
def test_script_takes_the_new_layer_types():
    for arch, layers, name in (("transformer_deepnorm", "18", "transformer_deepnorm_18l"),
                               ("transformer_admin", "6", "transformer_admin")):
        p = run(["bash", TRAIN_SH, arch, layers, "--gpus", "8", "--dry-run"])
        assert f"--arch {name} " in p.stdout and "--update-freq 16" in p.stdout
