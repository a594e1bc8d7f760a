"""The fast path (--b2t-fast, fast.py) computes what the plain path computes.

Trainers are built exactly as fairseq-train builds them (bench.build_trainer) at tiny sizes, with
the same seed and the same synthetic fairseq-style batches, for Post-LN, Pre-LN and B2T layers.

Tolerances: the optimizer does fairseq's operations in fairseq's order, so it is checked
bitwise. The attention kernel differs (SDPA scales the scores instead of the query, and sums in
another order), so its outputs differ from fairseq's by float32 rounding (a few 1e-7 relative);
after 20 Adam updates of a model whose loss is about 5.5 the observed loss difference is below
1e-5, and the tests allow RTOL = 1e-5 relative (about 100 float32 ulps of the loss), far below
the smallest change any real difference in the math makes (a changed mask, scale or residual
moves the first loss by more than 1e-2).
"""

import argparse
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import REPO, run, train_args, train_losses

from b2t_fairseq import fast
from b2t_tools.analysis import bench, fast_curve

pytestmark = pytest.mark.usefixtures("compose_once")  # many trainers of the same args (conftest.py)

LAYER_TYPES = {"post": "plugin_post_ln", "pre": "plugin_pre_ln", "b2t": "plugin_b2t"}
RTOL = 1e-5
UPDATES = 20


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from fairseq.data import Dictionary

    workdir = str(bench.write_dictionary(tmp_path_factory.mktemp("fast"), bench.SIZES["quick"]["vocab"]))
    batches = bench.make_batches(Dictionary.load(os.path.join(workdir, "dict.src.txt")), 256, 4, seed=3)
    return workdir, batches


def make_trainer(workdir, ln, fast_flag, optimizer=None, extra=()):
    argv = bench.fairseq_argv(LAYER_TYPES[ln], workdir, "quick", 2, 256, "cpu", "fp32")
    if fast_flag:
        argv = fast.translate_argv(argv + ["--b2t-fast"])
    if optimizer:
        argv[argv.index("--optimizer") + 1] = optimizer
    # a learning rate that moves the weights within 20 updates (the bench's 4000 warmup updates would not)
    return bench.build_trainer(argv + ["--warmup-updates", "5", "--lr", "0.002", *extra])


def train(trainer, batches, n, start=0):
    """Unrounded loss of each update (fairseq's logging output rounds it)."""
    losses, real = [], trainer.task.train_step

    def capture(*a, **k):
        out = real(*a, **k)
        losses.append(out[0].item() / out[1])
        return out

    trainer.task.train_step = capture
    try:
        for i in range(start, start + n):
            assert trainer.train_step([batches[i % len(batches)]]) is not None
    finally:
        trainer.task.train_step = real
    return losses


def params(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def attention_classes(trainer):
    from fairseq.modules.multihead_attention import MultiheadAttention

    return {type(m).__name__ for m in trainer.model.modules() if isinstance(m, MultiheadAttention)}


@pytest.mark.parametrize("ln", LAYER_TYPES)
def test_20_updates_give_the_same_losses_with_and_without_the_flag(data, ln):
    workdir, batches = data
    plain = make_trainer(workdir, ln, False)
    quick = make_trainer(workdir, ln, True)
    assert attention_classes(plain) == {"MultiheadAttention"}
    assert attention_classes(quick) == {"FastMultiheadAttention"}
    assert type(quick.optimizer.optimizer).__name__ == "ForeachAdam"
    assert [n for n, _ in plain.model.named_parameters()] == [n for n, _ in quick.model.named_parameters()]
    a, b = train(plain, batches, UPDATES), train(quick, batches, UPDATES)
    assert a[0] > 3 and a[-4] < a[0] - 0.2  # it learns (same batch): not a comparison of two constants
    assert b == pytest.approx(a, rel=RTOL, abs=0)
    diff = max((x - y).abs().max().item() for x, y in zip(params(plain), params(quick)))
    # the attention kernel really differs, by rounding only; Adam divides by sqrt(v), which turns a
    # rounding difference in a near-zero gradient into up to a fraction of a step (lr 0.002)
    assert 0 < diff < 1e-3


@pytest.mark.parametrize("ln", LAYER_TYPES)
def test_the_optimizer_alone_is_bitwise_fairseqs_adam(data, ln):
    workdir, batches = data
    plain = make_trainer(workdir, ln, False)
    foreach = make_trainer(workdir, ln, False, optimizer="b2t_adam")
    assert type(foreach.optimizer.optimizer).__name__ == "ForeachAdam"
    assert train(plain, batches, UPDATES) == train(foreach, batches, UPDATES)
    assert all(torch.equal(x, y) for x, y in zip(params(plain), params(foreach)))


def fairseq_adam_pair(kind, **kw):
    from fairseq.optim.adam import Adam

    torch.manual_seed(0)
    shapes = [(5, 3), (7,), (2, 2, 2)]
    dtype = torch.float16 if kind == "fp16" else torch.float32
    ps = [torch.randn(s).to(dtype) for s in shapes]
    a = [torch.nn.Parameter(p.clone()) for p in ps]
    b = [torch.nn.Parameter(p.clone()) for p in ps]
    return a, b, Adam(a, **kw), fast.ForeachAdam(b, **kw)


def step_both(a, b, oa, ob, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for x, y in zip(a, b):
            grad = torch.randn(x.shape, generator=g).to(x.dtype)
            x.grad, y.grad = grad.clone(), grad.clone()
        oa.step()
        ob.step()


@pytest.mark.parametrize("kind,kw", [("fp32", {}), ("fp32", dict(weight_decay=0.1, amsgrad=True, eps=1e-6)),
                                     ("fp16", dict(weight_decay=0.01))])
def test_foreach_adam_steps_and_state_dicts_are_fairseqs(kind, kw, monkeypatch):
    monkeypatch.setattr(fast, "CPU_CHUNK", 10)  # several multi-tensor passes per step
    a, b, oa, ob = fairseq_adam_pair(kind, lr=0.01, betas=(0.9, 0.98), **kw)
    step_both(a, b, oa, ob, 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        assert isinstance(sb["state"][i]["step"], int) and sb["state"][i]["step"] == 5
        for k in sa["state"][i]:
            if k != "step":
                assert sb["state"][i][k].dtype == torch.float32 and torch.equal(sa["state"][i][k], sb["state"][i][k])
    # each loads the other's state and they go on in step: interchangeable both ways
    a2, b2, oa2, ob2 = fairseq_adam_pair(kind, lr=0.01, betas=(0.9, 0.98), **kw)
    for x, y, src in zip(a2, b2, a):
        x.data.copy_(src)
        y.data.copy_(src)
    oa2.load_state_dict(sb)
    ob2.load_state_dict(sa)
    step_both(a2, b2, oa2, ob2, 3, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a2, b2))


def test_foreach_grad_norm_clips_as_fairseq_does():
    from fairseq import utils

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(s)) for s in [(30, 4), (4,), (6, 6)]]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for x, y in zip(a, b):
        x.grad = torch.randn(x.shape) * 3
        y.grad = x.grad.clone()
    na = utils.clip_grad_norm_(a, 0.1)
    nb = fast.clip_grad_norm_foreach(b, 0.1)
    assert na.item() > 0.1 and torch.equal(na, nb)
    assert all(torch.equal(x.grad, y.grad) for x, y in zip(a, b))
    assert torch.linalg.vector_norm(torch.cat([y.grad.flatten() for y in b])).item() == pytest.approx(0.1, rel=1e-4)


def generate(trainer, src):
    from fairseq.sequence_generator import SequenceGenerator

    model = trainer.model.eval()
    gen = SequenceGenerator([model], trainer.task.target_dictionary, beam_size=4, max_len_b=12)
    lengths = src.ne(trainer.task.source_dictionary.pad()).sum(1)
    with torch.no_grad():
        hyps = gen.forward({"net_input": {"src_tokens": src, "src_lengths": lengths}})
    return [[(h["tokens"].tolist(), h["score"].item()) for h in beam] for beam in hyps]


def copy_batches(workdir, n=4, bsz=16, seed=0):
    """A task a few updates can learn (target = source, over 12 words), so that beam search
    output depends on the input."""
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(os.path.join(workdir, "dict.src.txt"))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        sents = [torch.cat([torch.randint(d.nspecial, d.nspecial + 12, (int(k),), generator=g), torch.tensor([d.eos()])])
                 for k in torch.randint(3, 9, (bsz,), generator=g)]
        lens = torch.tensor([len(x) for x in sents])
        out.append({"id": torch.arange(bsz), "nsentences": bsz, "ntokens": int(lens.sum()),
                    "net_input": {"src_tokens": data_utils.collate_tokens(sents, d.pad(), d.eos(), left_pad=True),
                                  "src_lengths": lens,
                                  "prev_output_tokens": data_utils.collate_tokens(sents, d.pad(), d.eos(),
                                                                                  move_eos_to_beginning=True)},
                    "target": data_utils.collate_tokens(sents, d.pad(), d.eos())})
    return out


@pytest.mark.parametrize("ln", LAYER_TYPES)
def test_beam_search_gives_the_same_output(data, ln):
    workdir, _ = data
    batches = copy_batches(workdir)
    plain = make_trainer(workdir, ln, False, extra=["--lr", "0.01", "--dropout", "0"])
    train(plain, batches, 40)
    quick = make_trainer(workdir, ln, True)
    quick.model.load_state_dict(plain.model.state_dict())
    src = copy_batches(workdir, n=1, bsz=6, seed=1)[0]["net_input"]["src_tokens"]
    a, b = generate(plain, src), generate(quick, src)
    assert [[t for t, _ in beam] for beam in a] == [[t for t, _ in beam] for beam in b]
    assert [s for beam in b for _, s in beam] == pytest.approx([s for beam in a for _, s in beam], rel=RTOL)
    assert len({tuple(beam[0][0]) for beam in a}) > 1  # not one degenerate output for every input


@pytest.mark.parametrize("ln", LAYER_TYPES)
@pytest.mark.parametrize("first", ["plain", "fast"])
def test_checkpoints_resume_across_the_flag(data, ln, first, tmp_path):
    """5 updates one way, save, resume the other way (model, Adam state, lr schedule): the next
    5 losses are those of carrying on without switching."""
    workdir, batches = data
    flags = {"plain": False, "fast": True}
    other = "fast" if first == "plain" else "plain"
    a = make_trainer(workdir, ln, flags[first])
    train(a, batches, 5)
    path = str(tmp_path / "checkpoint.pt")
    a.consolidate_optimizer()
    a.save_checkpoint(path, {"train_iterator": {"epoch": 1}})
    b = make_trainer(workdir, ln, flags[other])
    assert b.load_checkpoint(path) is not None
    assert b.get_num_updates() == 5
    state = b.optimizer.optimizer.state_dict()["state"]
    assert state and all(s["step"] == 5 for s in state.values())
    cont_a, cont_b = train(a, batches, 5, start=5), train(b, batches, 5, start=5)
    assert cont_b == pytest.approx(cont_a, rel=RTOL, abs=0)


def test_bf16_autocast_runs_the_forward_in_bf16_with_fp32_weights(data):
    workdir, batches = data
    plain = make_trainer(workdir, "b2t", False)
    bf16 = make_trainer(workdir, "b2t", True, extra=["--b2t-bf16"])
    assert bf16.model.b2t_bf16 and not plain.model.b2t_bf16
    sample = batches[0]
    net = sample["net_input"]
    with torch.no_grad():
        assert bf16.model(**net)[0].dtype == torch.bfloat16
        assert plain.model(**net)[0].dtype == torch.float32
    a, b = train(plain, batches, 8), train(bf16, batches, 8)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    assert b[4] < b[0]  # it trains (same batch)
    # bf16 keeps 8 bits of mantissa: the losses follow fp32's to within about 1%, not bitwise
    assert b != a and b == pytest.approx(a, rel=2e-2)


def test_bf16_refuses_fp16_weights():
    with pytest.raises(fast.B2TError, match="--b2t-bf16 cannot be combined with --fp16"):
        fast.check_bf16_args(argparse.Namespace(b2t_bf16=True, fp16=True))
    fast.check_bf16_args(argparse.Namespace(b2t_bf16=False, fp16=True))


def test_b2t_train_selects_the_foreach_adam_only_with_the_flag():
    argv = ["data", "--optimizer", "adam", "--lr", "1e-3"]
    assert fast.translate_argv(argv) == argv
    assert fast.translate_argv(argv + ["--b2t-fast"])[2] == "b2t_adam"
    assert fast.translate_argv(["--optimizer=adam", "--b2t-fast"])[0] == "--optimizer=b2t_adam"
    assert fast.translate_argv(["--optimizer", "sgd", "--b2t-fast"])[1] == "sgd"


def test_future_mask_becomes_is_causal_and_other_masks_do_not():
    from fairseq import utils

    m = fast.FastMultiheadAttention(8, 2, self_attention=True)
    future = torch.triu(utils.fill_with_neg_inf(torch.zeros(5, 5)), 1)
    assert m._sdpa_mask(future, None, 5, 5, torch.float32) == (True, None, True)
    other = future.clone()
    other[0, 1] = 0.0
    ok, mask, causal = m._sdpa_mask(other, None, 5, 5, torch.float32)
    assert ok and not causal and torch.equal(mask, other)
    # padding after the real tokens may be dropped under is_causal; padding before them may not
    right = torch.tensor([[False] * 5, [False, False, False, True, True]])
    assert m._sdpa_mask(future, right, 5, 5, torch.float32) == (True, None, True)
    assert not m._sdpa_mask(future, right.flip(1), 5, 5, torch.float32)[0]
    assert not m._sdpa_mask(future, right.float(), 5, 5, torch.float32)[0]  # an additive padding mask
    assert not m._sdpa_mask(future.expand(4, 5, 5), None, 5, 5, torch.float32)[0]  # a per-head mask


def _left_padded(batch, pad):
    """The batch with its targets (and decoder inputs) padded on the left, as --left-pad-target collates."""
    def left(t):
        n = t.ne(pad).sum(1)
        return torch.stack([torch.cat([row[row.ne(pad)][:0].new_full((t.size(1) - k,), pad), row[:k]])
                            for row, k in zip(t, n.tolist())])
    out = dict(batch, net_input=dict(batch["net_input"]))
    out["target"] = left(batch["target"])
    out["net_input"]["prev_output_tokens"] = left(batch["net_input"]["prev_output_tokens"])
    return out


@pytest.mark.parametrize("ln", ["post", "b2t"])
def test_left_padded_targets_give_the_plain_losses(data, ln):
    """--left-pad-target puts the decoder's pads before its real tokens: the fast path must keep
    the padding mask under the causal one (it falls back to fairseq's kernel there)."""
    workdir, batches = data
    plain = make_trainer(workdir, ln, False)
    quick = make_trainer(workdir, ln, True)
    pad = plain.task.target_dictionary.pad()
    lefts = [_left_padded(b, pad) for b in batches]
    assert any(bool(b["target"][:, 0].eq(pad).any()) for b in lefts)  # some rows really start with pads
    a, b = train(plain, lefts, 6), train(quick, lefts, 6)
    assert b == pytest.approx(a, rel=RTOL, abs=0)


@pytest.mark.slow  # a child process or a whole pipeline: e2e
def test_gpu_checks_fast_path_stops_where_it_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would run for minutes")
    env = dict(os.environ, PYTHON=str(Path(os.sys.executable)), OUT=str(tmp_path))
    p = subprocess.run(["bash", str(REPO / "scripts/gpu-checks.sh"), "--fast-path"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "gpu-checks: error: no CUDA device visible" in p.stderr


@pytest.mark.slow  # a child process or a whole pipeline: e2e
def test_the_gpu_loss_curve_check_runs_and_compares(tmp_path):
    """The part of gpu-checks.sh --fast-path that is plugin code, at CPU sizes: it must run there
    unchanged, and its comparison must tell curves apart."""
    out = tmp_path / "curve.json"
    p = subprocess.run([os.sys.executable, "-m", "b2t_tools.analysis.fast_curve", "--size", "quick", "--layers", "2",
                        "--updates", "12", "--device", "cpu", "--dtype", "fp32", "--max-tokens", "256",
                        "--json", str(out)], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    import json

    r = json.loads(out.read_text())
    assert r["same_curve"] and r["updates"] == 12 and len(r["curves"]["fast"]) == 12
    assert len(set(r["curves"]["plain"])) == 12  # a curve of real, changing losses
    assert fast_curve.compare_curves(r["curves"]["plain"], [x * 1.05 for x in r["curves"]["plain"]])["same_curve"] is False


def test_bench_bf16_refuses_stock_variants():
    with pytest.raises(bench.BenchError, match="stock fairseq has no bf16"):
        bench.settle(bench.parse_args(["--quick", "--dtype", "bf16"]))
    opts = bench.settle(bench.parse_args(["--quick", "--dtype", "bf16", "--variants", "plugin_b2t", "fast_b2t"]))
    assert "--b2t-bf16" in bench.fairseq_argv("fast_b2t", "d", "quick", 2, 64, opts.device, opts.dtype)


def test_foreach_grad_norm_accumulates_fp16_gradients_in_fp32():
    from fairseq import utils

    grads = [torch.full((10,), 300.0, dtype=torch.float16), torch.full((3,), 7.0, dtype=torch.float16)]
    a = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    b = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for x, y, g in zip(a, b, grads):
        x.grad, y.grad = g.clone(), g.clone()
    na, nb = utils.clip_grad_norm_(a, 0.0), fast.clip_grad_norm_foreach(b, 0.0)
    assert nb.dtype == torch.float32 and torch.equal(na, nb)  # an fp16 norm would round to 948.5


def test_b2t_train_with_the_one_flag(toy_data_bin, tmp_path):
    """The console command: --b2t-fast selects b2t_adam and the fast attention, and trains as the
    plain command does (the log rounds losses to 3 decimals)."""
    logs = {}
    for name, extra in (("plain", []), ("fast", ["--b2t-fast"])):
        p = run(["b2t-train", *train_args(toy_data_bin, tmp_path / name, "transformer_b2t_tiny", 5, "--no-save",
                                          *extra)])
        logs[name] = p.stdout + p.stderr
    assert "'_name': 'b2t_adam'" in logs["fast"] and "'_name': 'b2t_adam'" not in logs["plain"]
    assert "FastMultiheadAttention" in logs["fast"] and "FastMultiheadAttention" not in logs["plain"]
    plain, quick = train_losses(logs["plain"]), train_losses(logs["fast"])
    assert sorted(plain) == [1, 2, 3, 4, 5] and quick == plain


def test_optimizer_chunks_cover_every_tensor_once(monkeypatch):
    ps = [torch.zeros(n) for n in (5, 300, 7, 7, 1000, 2)]
    monkeypatch.setattr(fast, "CPU_CHUNK", 310)
    chunks = fast._chunks(ps)
    assert chunks == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert fast._chunks(ps[:1]) == [(0, 1)]
