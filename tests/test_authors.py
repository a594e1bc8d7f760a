"""The authors' fairseq-0.9 fork: its checkpoints (b2t-import-checkpoint, automatic conversion on load,
never a Post-LN model) and its train.py command lines (b2t-train), fp32 evaluation.

The checkpoints are built here in the fork's format: a pickled argparse.Namespace ``args`` with the stock
arch transformer_wmt_en_de and the fork's own arguments, ``model`` with the fork's key names
(``decoder.embed_positions_original``, ``_float_tensor`` buffers), ``optimizer_history``, ``extra_state``,
saved in torch's pre-1.6 (non-zip) format as the fork's torch 1.4 did.
"""

import argparse
import math
import shlex
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DIMS,
    REPO,
    TINY,
    build,
    fork_args,
    fork_weights,
    reference_attention,
    run,
    toy_batch,
    write_fork_checkpoint,
)

from b2t_fairseq import authors
from b2t_fairseq.errors import B2TError
from b2t_fairseq.layers import B2TDecoderLayer, B2TEncoderLayer
from b2t_tools.commands import authors_argv
from b2t_tools.commands import import_checkpoint as imp
from b2t_tools.errors import ToolError


@pytest.fixture
def fork_ckpt(tmp_path, toy_data_bin):
    path = tmp_path / "b2t_layer3_authors.pt"
    state = write_fork_checkpoint(path, toy_data_bin)
    return path, state


# --- the B2T equations, computed from the checkpoint's tensors alone ------------------------------

def reference_logits(p, src, prev, pad, b2t=True):
    """y = LN_ffn(x + h + FFN(h)) (B2T) or LN_ffn(h + FFN(h)) (Post-LN), decoder likewise; shared embeddings."""
    from fairseq.modules.sinusoidal_positional_embedding import (
        SinusoidalPositionalEmbedding,
    )

    p = {k: v.float() for k, v in p.items()}
    d = DIMS["encoder_embed_dim"]
    table = SinusoidalPositionalEmbedding.get_embedding(64, d, pad)
    ln = lambda x, n: F.layer_norm(x, (d,), p[f"{n}.weight"], p[f"{n}.bias"])  # noqa: E731
    ffn = lambda x, n: F.linear(F.relu(F.linear(x, p[f"{n}.fc1.weight"], p[f"{n}.fc1.bias"])),  # noqa: E731
                                p[f"{n}.fc2.weight"], p[f"{n}.fc2.bias"])
    emb = p["encoder.embed_tokens.weight"]

    def embed(tokens):
        mask = tokens.ne(pad)
        positions = (torch.cumsum(mask.long(), 1) * mask.long()) + pad  # fairseq's make_positions
        return (math.sqrt(d) * emb[tokens] + table[positions]).transpose(0, 1)

    src_pad = src.eq(pad)
    x = embed(src)
    for i in range(DIMS["encoder_layers"]):
        n = f"encoder.layers.{i}"
        h = ln(x + reference_attention(p, f"{n}.self_attn", x, x, 4, key_pad=src_pad), f"{n}.self_attn_layer_norm")
        x = ln((x if b2t else 0) + h + ffn(h, n), f"{n}.final_layer_norm")
    enc = x
    x = embed(prev)
    for i in range(DIMS["decoder_layers"]):
        n = f"decoder.layers.{i}"
        h1 = ln(x + reference_attention(p, f"{n}.self_attn", x, x, 4, causal=True), f"{n}.self_attn_layer_norm")
        h2 = ln(h1 + reference_attention(p, f"{n}.encoder_attn", h1, enc, 4, key_pad=src_pad), f"{n}.encoder_attn_layer_norm")
        x = ln((x if b2t else 0) + h2 + ffn(h2, n), f"{n}.final_layer_norm")
    return F.linear(x.transpose(0, 1), emb)


def _load(path, data):
    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={"data": str(data)})
    return models[0].eval(), cfg, task


def _logits(model, task):
    src, lengths, prev = toy_batch(task)
    with torch.no_grad():
        return model(src, lengths, prev)[0], (src, prev)


# --- b2t-import-checkpoint ----------------------------------------------------------------------

def test_import_converts_args_and_keys_and_keeps_every_weight(fork_ckpt, tmp_path, capsys):
    path, original = fork_ckpt
    out = tmp_path / "imported.pt"
    assert imp.main([str(path), str(out)]) == 0
    assert "ln_position b2t, 3+2 layers, word dropout 0.1/0.1" in capsys.readouterr().out
    new = torch.load(out, weights_only=True)
    a = new["args"]
    assert a.arch == "transformer_b2t" and a.ln_position == "b2t" and a.residual_bottom_to_top is True
    assert (a.encoder_layers, a.decoder_layers, a.encoder_embed_dim) == (3, 2, 32)
    assert (a.word_dropout_src, a.word_dropout_tgt) == (0.1, 0.1) and a.dropout == 0.5
    assert a.b2t_rescale_init is True and "sampling_method worddrop" in a.b2t_imported_from
    assert not any(hasattr(a, k) for k in authors.FORK_ONLY_ARGS)
    assert a.min_lr == 1e-09  # fairseq's own checkpoint upgrade maps it to stop_min_lr
    assert not any("embed_positions_original" in k or k.endswith("_float_tensor") for k in new["model"])
    renamed = {k.replace("embed_positions_original", "embed_positions"): v for k, v in original["model"].items()
               if not k.endswith("_float_tensor")}
    renamed["decoder.output_projection.weight"] = original["model"]["decoder.embed_tokens.weight"]  # 0.12's name
    assert renamed.keys() == new["model"].keys()
    for k, v in renamed.items():
        assert v.dtype == new["model"][k].dtype and torch.equal(v, new["model"][k]), k
    assert new["optimizer_history"] == original["optimizer_history"] and new["extra_state"] == original["extra_state"]
    # the 2022 code had no rescaled initialization: recorded, no weight changes
    assert imp.main([str(path), str(tmp_path / "i2022.pt"), "--init", "2022"]) == 0
    assert torch.load(tmp_path / "i2022.pt", weights_only=True)["args"].b2t_rescale_init is False


def test_imported_model_computes_the_b2t_equations(fork_ckpt, tmp_path, toy_data_bin):
    path, original = fork_ckpt
    imp.main([str(path), str(tmp_path / "imported.pt")])
    model, cfg, task = _load(tmp_path / "imported.pt", toy_data_bin)
    assert all(isinstance(layer, B2TEncoderLayer) for layer in model.encoder.layers)
    assert all(isinstance(layer, B2TDecoderLayer) for layer in model.decoder.layers)
    assert model.encoder.layer_norm is None and model.decoder.layer_norm is None
    logits, (src, prev) = _logits(model, task)
    pad = task.source_dictionary.pad()
    expected = reference_logits(original["model"], src, prev, pad, b2t=True)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    post_ln = reference_logits(original["model"], src, prev, pad, b2t=False)
    assert (logits - post_ln).abs().max() > 0.1  # Post-LN with these weights is another function


def test_fp16_weights_stay_fp16_and_decode_in_fp32(tmp_path, toy_data_bin):
    path = tmp_path / "fp16.pt"
    original = write_fork_checkpoint(path, toy_data_bin, dtype=torch.float16, seed=3)
    new = imp.import_file(str(path), str(tmp_path / "out.pt"))
    assert new["model"]["encoder.layers.0.fc1.weight"].dtype == torch.float16
    model, _, task = _load(tmp_path / "out.pt", toy_data_bin)
    assert next(model.parameters()).dtype == torch.float32
    logits, (src, prev) = _logits(model, task)
    expected = reference_logits(original["model"], src, prev, task.source_dictionary.pad())
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_the_authors_file_loads_as_b2t_without_import(fork_ckpt, tmp_path, toy_data_bin):
    """load_model_ensemble (generate, validate, interactive) and from_pretrained convert on the fly."""
    from fairseq.models.transformer import TransformerModel

    path, original = fork_ckpt
    model, cfg, task = _load(path, toy_data_bin)
    assert cfg.model.arch == "transformer_b2t" and cfg.model.ln_position == "b2t"
    logits, (src, prev) = _logits(model, task)
    torch.testing.assert_close(logits, reference_logits(original["model"], src, prev, task.source_dictionary.pad()),
                               rtol=1e-4, atol=1e-4)
    hub = TransformerModel.from_pretrained(str(path.parent), checkpoint_file=path.name,
                                           data_name_or_path=str(toy_data_bin))
    m = hub.models[0]
    m.eval()
    assert isinstance(m.encoder.layers[0], B2TEncoderLayer)
    with torch.no_grad():
        torch.testing.assert_close(m(*toy_batch(task))[0], logits)


def test_stock_arch_checkpoint_with_b2t_flag_never_loads_as_post_ln(tmp_path, toy_data_bin):
    """Even without any other fork argument or key: residual_bottom_to_top=True means B2T."""
    args = argparse.Namespace(**{k: v for k, v in vars(fork_args(toy_data_bin)).items()
                                 if k not in authors.FORK_ONLY_ARGS or k == "residual_bottom_to_top"})
    weights = {k.replace("embed_positions_original", "embed_positions"): v
               for k, v in fork_weights(toy_data_bin).items() if not k.endswith("_float_tensor")}
    torch.save({"args": args, "model": weights, "optimizer_history": [{"criterion_name": "x", "num_updates": 1,
                "optimizer_name": "FairseqAdam", "lr_scheduler_state": {}}], "extra_state": {"epoch": 1}},
               tmp_path / "stock.pt")
    model, cfg, task = _load(tmp_path / "stock.pt", toy_data_bin)
    assert isinstance(model.decoder.layers[-1], B2TDecoderLayer)


def test_b2t_weights_into_a_post_ln_model_are_refused(fork_ckpt, toy_data_bin):
    """The resume route builds the model from the command line: a Post-LN one must not take B2T weights."""
    from fairseq import checkpoint_utils

    path, _ = fork_ckpt
    stock, _, _ = build(toy_data_bin, "transformer_wmt_en_de", *TINY)
    state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    with pytest.raises(B2TError, match="holds a B2T model .* Post-LN.*b2t-import-checkpoint"):
        stock.load_state_dict(state["model"], strict=True)
    b2t, _, _ = build(toy_data_bin, "transformer_b2t", *TINY)  # the right model takes them
    b2t.load_state_dict(checkpoint_utils.load_checkpoint_to_cpu(str(path))["model"], strict=True)


def test_fork_state_dict_loads_straight_into_a_b2t_model(toy_data_bin):
    """Without the args (a bare state dict of the fork): transformer_b2t renames the decoder's positions."""
    b2t, _, _ = build(toy_data_bin, "transformer_b2t", *TINY)
    weights = fork_weights(toy_data_bin, seed=4)
    b2t.load_state_dict(dict(weights), strict=True)
    assert torch.equal(b2t.decoder.layers[1].fc2.weight, weights["decoder.layers.1.fc2.weight"])
    assert torch.equal(b2t.decoder.output_projection.weight, weights["decoder.embed_tokens.weight"])


def test_b2t_train_restore_into_stock_arch_is_one_line(fork_ckpt, tmp_path, toy_data_bin):
    path, _ = fork_ckpt
    p = run(["b2t-train", toy_data_bin, "--arch", "transformer_wmt_en_de", *TINY, "--share-all-embeddings", "--cpu",
             "--optimizer", "adam", "--lr", "0.001", "--max-tokens", "500", "--max-update", "1", "--restore-file",
             path, "--save-dir", tmp_path / "save", "--no-save"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    err = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and err[0].startswith("b2t-train: error: checkpoint") and "b2t-import-checkpoint" in err[0]


@pytest.mark.parametrize("over,what", [
    ({"no_layer_norm": True}, "--no-layer-norm"),
    ({"represent_length_by_lrpe": True}, "length-ratio"),
    ({"encoder_normalize_before": True, "decoder_normalize_before": True}, "B2T on Pre-LN"),
    ({"arch": "lightconv_lm"}, "'lightconv_lm' model"),  # language models: tests/test_lm_authors.py
])
def test_unconvertible_checkpoints_are_one_line_errors(tmp_path, toy_data_bin, capsys, over, what):
    from fairseq import checkpoint_utils

    path = tmp_path / "odd.pt"
    write_fork_checkpoint(path, toy_data_bin, **over)
    assert imp.main([str(path), str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("b2t-import-checkpoint: error:") and err.strip().count("\n") == 0 and what in err
    assert not (tmp_path / "o.pt").exists()
    with pytest.raises(B2TError, match=f"checkpoint {path}.*b2t-import-checkpoint cannot convert|"
                                       f"checkpoint {path}.*b2t-import-checkpoint converts"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))


def test_import_refuses_what_needs_no_import(tmp_path, toy_data_bin, fork_ckpt, capsys):
    path, _ = fork_ckpt
    imp.main([str(path), str(tmp_path / "once.pt")])
    capsys.readouterr()
    assert imp.main([str(tmp_path / "once.pt"), str(tmp_path / "twice.pt")]) == 2
    assert "already a transformer_b2t checkpoint" in capsys.readouterr().err
    assert imp.main([str(tmp_path / "missing.pt"), str(tmp_path / "x.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_b2t_generate_decodes_the_authors_file_as_the_imported_one(fork_ckpt, tmp_path, toy_data_bin):
    path, _ = fork_ckpt
    imp.main([str(path), str(tmp_path / "imported.pt")])
    outs = []
    for ckpt in (path, tmp_path / "imported.pt"):
        p = run(["b2t-generate", toy_data_bin, "--path", ckpt, "--gen-subset", "valid", "--beam", "2", "--cpu",
                 "--max-tokens", "2000", "--max-len-b", "5"])
        outs.append(sorted(line for line in p.stdout.splitlines() if line.startswith(("H-", "S-"))))
    assert len(outs[0]) == 80 and outs[0] == outs[1]


# --- the authors' train.py command line ---------------------------------------------------------

# the 2023 README of github.com/takase/b2t_connection, 18L-18L on 8 GPUs, as printed there
README_2023_18L = """
python -u train.py \\
    pre-processed-data-dir --source-lang en --target-lang de --fp16 \\
    --arch transformer_wmt_en_de --optimizer adam --adam-betas '(0.9, 0.98)' \\
    --clip-norm 0.1 --lr 0.001 --lr-scheduler inverse_sqrt --warmup-updates 4000 \\
    --warmup-init-lr 1e-07 --dropout 0.5 --weight-decay 0.0 --criterion label_smoothed_cross_entropy \\
    --label-smoothing 0.1 --max-tokens 3584 --min-lr 1e-09 --update-freq 16  --log-interval 100  --max-update 50000 \\
    --sampling-method worddrop --enc-replace-rate 0.1 --dec-replace-rate 0.1 --decay-val 1000 \\
    --share-all-embeddings --keep-last-epochs 10 --seed 1 --save-dir model-save-dir \\
    --encoder-layers 18 --decoder-layers 18 --residual-bottom-to-top \\
"""
# what only says where and how a run is launched and logged, not what it trains
LAUNCH_ONLY = {"data", "save_dir", "log_format", "log_file", "log_interval", "distributed_world_size", "source_lang",
               "target_lang", "user_dir"}
SMALL = ["--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32",
         "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2"]


def _parse(argv):
    from fairseq import options

    return options.parse_args_and_arch(options.get_training_parser(), argv)


def test_readme_18l_command_trains_the_recipe_model(toy_data_bin):
    authors = shlex.split(README_2023_18L.replace("\\\n", " "))[3:]  # drop "python -u train.py"
    authors[0] = str(toy_data_bin)
    ours = run([sys.executable, "-m", "b2t_tools.wmt.train", "transformer_b2t", "18", "--gpus", "8", "--dry-run",
                "--data", toy_data_bin], cwd=REPO).stdout
    ours = shlex.split(ours.strip())[1:]  # drop the b2t-train program
    a, o = _parse(authors_argv.translate(authors)), _parse(ours)
    va, vo = vars(a), vars(o)
    diff = {k for k in va.keys() | vo.keys() if va.get(k) != vo.get(k)} - LAUNCH_ONLY
    # --min-lr 1e-09 is 0.12's --stop-min-lr: a stop criterion inverse_sqrt never reaches in 50k updates;
    # transformer_b2t and transformer_b2t_18l name the same model (the layer counts are explicit here)
    assert diff == {"stop_min_lr", "arch"}, {k: (va.get(k), vo.get(k)) for k in diff}
    assert (a.arch, o.arch) == ("transformer_b2t", "transformer_b2t_18l")
    assert a.stop_min_lr == 1e-09 and 0.001 * math.sqrt(4000 / 50000) > 1e-09
    assert (a.arch, a.ln_position, a.encoder_layers, a.word_dropout_src, a.word_dropout_tgt, a.dropout) == \
        ("transformer_b2t", "b2t", 18, 0.1, 0.1, 0.5)
    assert a.b2t_rescale_init is True and a.update_freq == [16] and a.fp16 is True
    # the same model: 18+18 B2T layers, the same names and shapes, the same (rescaled) initial weights
    ma, _, _ = build(toy_data_bin, a.arch, *authors_argv.translate(authors)[1:], *SMALL, seed=5)
    mo, _, _ = build(toy_data_bin, o.arch, *ours[1:], *SMALL, seed=5)
    sa, so = ma.state_dict(), mo.state_dict()
    assert list(sa) == list(so) and len(ma.encoder.layers) == 18 == len(mo.decoder.layers)
    assert all(isinstance(layer, B2TEncoderLayer) for layer in ma.encoder.layers)
    assert all(torch.equal(sa[k], so[k]) for k in sa)


def test_authors_flags_translate():
    t = authors_argv.translate
    assert t(["d", "--arch", "transformer_wmt_en_de", "--residual-bottom-to-top"]) == \
        ["d", "--arch", "transformer_b2t", "--residual-bottom-to-top", "--dropout", "0.1"]  # the stock default
    assert t(["d", "--arch=transformer_wmt_en_de", "--sampling-method=worddrop", "--enc-replace-rate=0.2",
              "--dropout", "0.3"]) == ["d", "--arch", "transformer_post_ln", "--dropout", "0.3",
                                       "--word-dropout-src", "0.2", "--word-dropout-tgt", "0.0"]  # no B2T flag
    assert t(["d", "--arch", "transformer_b2t", "--min-lr", "1e-9"]) == ["d", "--arch", "transformer_b2t",
                                                                         "--stop-min-lr", "1e-9"]
    cosine = ["d", "--lr-scheduler", "cosine", "--min-lr", "1e-9"]
    assert t(cosine) == cosine  # cosine's own --min-lr (the floor of the schedule) is not the 0.9 stop flag
    plain = ["d", "--arch", "transformer_wmt_en_de", "--dropout", "0.3"]
    assert t(plain) == plain  # no fork flag: stock fairseq's model, untouched
    with pytest.raises(ToolError, match="similarity .* not implemented"):
        t(["d", "--sampling-method", "similarity"])
    with pytest.raises(ToolError, match="--arch transformer_vaswani_wmt_en_de_big"):
        t(["d", "--arch", "transformer_vaswani_wmt_en_de_big", "--residual-bottom-to-top"])
    with pytest.raises(ToolError, match=r"must be in \[0, 1\)"):
        t(["d", "--sampling-method", "worddrop", "--enc-replace-rate", "1.5"])


def test_other_sampling_method_is_one_line_from_b2t_train(toy_data_bin):
    p = run(["b2t-train", toy_data_bin, "--arch", "transformer_wmt_en_de", "--residual-bottom-to-top",
             "--sampling-method", "worddrop_with_sim", "--enc-replace-rate", "0.1"], check=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert p.stderr.startswith("b2t-train: error: --sampling-method worddrop_with_sim")


# --- fp32 evaluation --------------------------------------------------------------------------

def test_wmt_evaluate_decodes_in_fp32_unless_asked(tmp_path, monkeypatch):
    import json

    from b2t_tools.wmt import evaluate as ev

    data = tmp_path / "data"
    (data / "refs").mkdir(parents=True)
    (data / "subsets.json").write_text(json.dumps({"2014": "test"}))
    (data / "refs" / "newstest2014.de").write_text("Ein Haus .\n")
    (data / "refs" / "newstest2014.tok.de").write_text("Ein Haus .\n")
    for f in ("test.en-de.en.bin", "test.en-de.en.idx", "test.en-de.de.bin", "test.en-de.de.idx"):
        (data / f).write_bytes(b"x")  # evaluate checks that the subsets exist before translating
    torch.save({"model": {}}, tmp_path / "avg.pt")
    seen = []

    def fake_generate(data, ckpt, subset, lenpen, args, workdir):
        seen.append(ev.generation_argv(data, ckpt, subset, lenpen, args, workdir))
        return ["Ein Haus ."]

    monkeypatch.setattr(ev, "generate", fake_generate)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    common = ["--data", str(data), "--checkpoint", str(tmp_path / "avg.pt"), "--years", "2014"]
    assert ev.main(common + ["--out", str(tmp_path / "fp32.json")]) == 0
    assert ev.main(common + ["--out", str(tmp_path / "fp16.json"), "--fp16"]) == 0
    assert "--fp16" not in seen[0] and "--cpu" not in seen[0] and "--fp16" in seen[1]
    assert json.loads((tmp_path / "fp32.json").read_text())["generation"]["precision"] == "fp32"
    assert json.loads((tmp_path / "fp16.json").read_text())["generation"]["precision"] == "fp16"


@pytest.mark.parametrize("ln", ["deepnorm", "admin"])
def test_deepnorm_and_admin_weights_into_a_post_ln_model_are_refused(ln, toy_data_bin, tmp_path):
    """Same names, other model: a DeepNorm checkpoint (identical keys to stock) must not load as Post-LN."""
    from fairseq import checkpoint_utils

    src, _, args = build(toy_data_bin, f"transformer_{ln}", *TINY)
    history = [{"criterion_name": "x", "num_updates": 1, "optimizer_name": "FairseqAdam", "lr_scheduler_state": {}}]
    torch.save({"args": args, "model": src.state_dict(), "optimizer_history": history, "extra_state": {"epoch": 1}},
               tmp_path / "ckpt.pt")
    post, _, _ = build(toy_data_bin, "transformer_post_ln", *TINY)
    state = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "ckpt.pt"))
    with pytest.raises(B2TError, match=f"holds a {'DeepNorm' if ln == 'deepnorm' else 'Admin'} model .* Post-LN.*"
                                       f"--arch transformer_{ln}"):
        post.load_state_dict(state["model"], strict=False)
    same, _, _ = build(toy_data_bin, f"transformer_{ln}", *TINY)  # the right model takes them
    same.load_state_dict(checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "ckpt.pt"))["model"], strict=True)
