"""b2t-average-checkpoints: selection of the last N checkpoints, the average itself, clear errors."""

import argparse

import pytest
import torch
from helpers import run

from b2t_tools.commands import average_checkpoints as avg


def _ckpt(path, value, epoch=1, extra_key=False, **model_args):
    model = {"w": torch.full((2, 3), float(value)), "h": torch.full((2,), float(value)).half(),
             "steps": torch.tensor([epoch])}
    if extra_key:
        model["other"] = torch.zeros(1)
    # fairseq checkpoints pickle an argparse.Namespace: torch>=2.6's safe loader refuses it unless allowed
    args = argparse.Namespace(**{"arch": "transformer_b2t", "ln_position": "b2t", "residual_bottom_to_top": True,
                                 "encoder_layers": 6, **model_args})
    torch.save({"model": model, "args": args, "extra_state": {"epoch": epoch},
                "optimizer_history": [], "last_optimizer_state": None}, path)
    return path


@pytest.fixture
def run_dir(tmp_path):
    for e in range(1, 6):
        _ckpt(tmp_path / f"checkpoint{e}.pt", e, epoch=e)
        _ckpt(tmp_path / f"checkpoint_{e}_{e * 100}.pt", 10 * e, epoch=e)
    _ckpt(tmp_path / "checkpoint_last.pt", 99, epoch=5)
    _ckpt(tmp_path / "checkpoint_best.pt", 98, epoch=5)
    return tmp_path


@pytest.mark.e2e
def test_last_epoch_checkpoints_are_averaged(run_dir):
    out = run_dir / "avg.pt"
    p = run(["b2t-average-checkpoints", "--inputs", run_dir, "--num-epoch-checkpoints", "3", "--output", out])
    assert "checkpoint5.pt" in p.stdout and "checkpoint3.pt" in p.stdout and "checkpoint2.pt" not in p.stdout
    state = torch.load(out, weights_only=True)
    assert torch.allclose(state["model"]["w"], torch.full((2, 3), 4.0))  # mean of 3, 4, 5
    # fp16 inputs (fp16 training saves fp16 weights) average into fp32, as the authors' script does
    assert state["model"]["h"].dtype == torch.float32 and float(state["model"]["h"][0]) == 4.0
    assert state["model"]["w"].dtype == torch.float32 and state["model"]["steps"].dtype == torch.int64
    assert state["extra_state"]["epoch"] == 5  # the rest comes from the newest input
    assert not (run_dir / "avg.pt.tmp").exists()


def test_update_checkpoints_and_upper_bound(run_dir):
    paths = avg.last_checkpoints(str(run_dir), 2, by_update=True, upper_bound=300)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["checkpoint_3_300.pt", "checkpoint_2_200.pt"]
    state = avg.average(paths)
    assert torch.allclose(state["model"]["w"], torch.full((2, 3), 25.0))


def test_explicit_inputs(run_dir):
    state = avg.average([str(run_dir / "checkpoint1.pt"), str(run_dir / "checkpoint2.pt")])
    assert torch.allclose(state["model"]["w"], torch.full((2, 3), 1.5))


def _main(args, capsys):
    rc = avg.main([str(a) for a in args])
    return rc, capsys.readouterr().err


def test_too_few_checkpoints_is_one_line(run_dir, capsys):
    rc, err = _main(["--inputs", run_dir, "--num-epoch-checkpoints", "10", "--output", run_dir / "o.pt"], capsys)
    assert rc == 2
    assert err.strip().count("\n") == 0 and "has 5 epoch checkpoint(s), 10 needed" in err


def test_truncated_checkpoint_is_one_line(run_dir, capsys):
    good = (run_dir / "checkpoint5.pt").read_bytes()
    (run_dir / "checkpoint5.pt").write_bytes(good[: len(good) // 2])
    rc, err = _main(["--inputs", run_dir, "--num-epoch-checkpoints", "2", "--output", run_dir / "o.pt"], capsys)
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("b2t-average-checkpoints: error: cannot read checkpoint") and "truncated" in err
    assert err.strip().count("\n") == 0
    assert not (run_dir / "o.pt").exists()


def test_not_a_checkpoint_and_mismatched_runs(run_dir, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint\n")
    with pytest.raises(avg.ToolError, match="truncated or corrupt"):
        avg.average([str(junk)])
    other = _ckpt(tmp_path / "other.pt", 1, extra_key=True)
    with pytest.raises(avg.ToolError, match="other parameters"):
        avg.average([str(run_dir / "checkpoint1.pt"), str(other)])


def test_checkpoint_with_damaged_weights_is_refused_not_averaged(tmp_path):
    big = tmp_path / "big.pt"
    torch.save({"model": {"w": torch.arange(20000, dtype=torch.float32)}, "args": argparse.Namespace()}, big)
    data = bytearray(big.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the weights: torch.load alone accepts the file
    big.write_bytes(bytes(data))
    assert torch.load(big, weights_only=True)["model"]["w"].shape == (20000,)
    with pytest.raises(avg.ToolError, match="truncated or corrupt"):
        avg.load(str(big))


def test_fp16_average_is_fp32_and_exact(tmp_path):
    """Two fp16 weights whose mean is not an fp16 number: the fp32 average keeps it."""
    a, b = torch.tensor([1.0], dtype=torch.float16), torch.tensor([1.0009765625], dtype=torch.float16)  # 1 ulp apart
    for name, w in (("a.pt", a), ("b.pt", b)):
        torch.save({"model": {"w": w}, "args": argparse.Namespace(arch="transformer_b2t")}, tmp_path / name)
    state = avg.average([str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])
    assert state["model"]["w"].dtype == torch.float32 and float(state["model"]["w"]) == 1.00048828125


@pytest.mark.parametrize("other", [
    {"ln_position": "post", "residual_bottom_to_top": False, "arch": "transformer_post_ln"},  # Post-LN, same names
    {"arch": "transformer_wmt_en_de", "ln_position": None, "residual_bottom_to_top": False},  # stock Post-LN
    {"encoder_layers": 18},
])
def test_checkpoints_of_other_models_are_refused(run_dir, tmp_path, capsys, other):
    """A B2T and a Post-LN checkpoint have the same parameter names; averaging them used to
    succeed and label the result B2T."""
    stranger = _ckpt(tmp_path / "stranger.pt", 7, epoch=9, **other)
    rc, err = _main(["--inputs", run_dir / "checkpoint5.pt", stranger, "--output", tmp_path / "o.pt"], capsys)
    assert rc == 2 and err.strip().count("\n") == 0, err
    assert "is another model than" in err and "one training run only" in err
    assert not (tmp_path / "o.pt").exists()


def test_authors_fork_b2t_checkpoint_counts_as_b2t(run_dir, tmp_path):
    """The authors' fork says B2T with arch transformer_wmt_en_de + residual_bottom_to_top: same model."""
    fork = _ckpt(tmp_path / "fork.pt", 3, arch="transformer_wmt_en_de", ln_position=None, sampling_method="worddrop")
    state = avg.average([str(run_dir / "checkpoint1.pt"), str(fork)])
    assert torch.allclose(state["model"]["w"], torch.full((2, 3), 2.0))
