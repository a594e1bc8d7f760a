"""The command line of the b2t commands: the authors' train.py command forms build the layer type the
authors' code builds (and b2t-import-checkpoint converts the same way), and every console command
in setup.py answers --help.

The models are built in-process from a folder holding only a dictionary (no fairseq-preprocess), so
these run in the fast suite.
"""

import argparse
import ast
import json
import shlex
import sys

import pytest
import torch
from helpers import REPO, build, run

from b2t_fairseq import authors, layer_types
from b2t_fairseq.errors import B2TConfigError
from b2t_tools.commands import authors_argv
from b2t_tools.errors import ToolError

# the authors' README command (2023), without the data folder; 18 layers with word dropout
AUTHORS_18L = shlex.split(
    "--source-lang en --target-lang de --fp16 --arch transformer_wmt_en_de --optimizer adam "
    "--adam-betas '(0.9, 0.98)' --clip-norm 0.1 --lr 0.001 --lr-scheduler inverse_sqrt --warmup-updates 4000 "
    "--warmup-init-lr 1e-07 --dropout 0.5 --weight-decay 0.0 --criterion label_smoothed_cross_entropy "
    "--label-smoothing 0.1 --max-tokens 3584 --min-lr 1e-09 --update-freq 16 --log-interval 100 --max-update 50000 "
    "--sampling-method worddrop --enc-replace-rate 0.1 --dec-replace-rate 0.1 --decay-val 1000 "
    "--share-all-embeddings --keep-last-epochs 10 --seed 1 --save-dir model-save-dir "
    "--encoder-layers 18 --decoder-layers 18 --residual-bottom-to-top")
WORD_DROPOUT = ["--sampling-method", "worddrop", "--enc-replace-rate", "0.1", "--dec-replace-rate", "0.1"]
NORMALIZE_BEFORE = ["--encoder-normalize-before", "--decoder-normalize-before"]
SMALL = ["--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32",
         "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2"]


@pytest.fixture(scope="module")
def dict_dir(tmp_path_factory):
    """A data folder with a joined dictionary only: enough to build a translation model."""
    folder = tmp_path_factory.mktemp("dict_only")
    words = "".join(f"w{i} {100 - i}\n" for i in range(40))
    for lang in ("en", "de"):
        (folder / f"dict.{lang}.txt").write_text(words)
    return folder


def authors_form(layer_type, layers, word_dropout):
    """One of the authors' command forms: the README command, the 6-layer variant the README describes
    (--dropout 0.3, no sampling flags), with B2T, Post-LN (no --residual-bottom-to-top) or Pre-LN."""
    argv = [a for a in AUTHORS_18L if a not in ("--fp16", "--residual-bottom-to-top")]
    for flag in ("--sampling-method", "--enc-replace-rate", "--dec-replace-rate"):
        i = argv.index(flag)
        del argv[i:i + 2]
    argv[argv.index("--encoder-layers") + 1] = argv[argv.index("--decoder-layers") + 1] = str(layers)
    argv[argv.index("--dropout") + 1] = "0.5" if layers >= 18 else "0.3"
    if word_dropout:
        argv += WORD_DROPOUT
    argv += {"b2t": ["--residual-bottom-to-top"], "post": [], "pre": NORMALIZE_BEFORE}[layer_type]
    return argv


def fork_namespace(argv):
    """The args the authors' fork saves for this command (the flags that choose the model)."""
    a = argparse.Namespace(arch="transformer_wmt_en_de", residual_bottom_to_top=False, encoder_normalize_before=False,
                           decoder_normalize_before=False, sampling_method="none", enc_replace_rate=0.0,
                           dec_replace_rate=0.0, decay_val=1000, no_layer_norm=False, encoder_layers=6, decoder_layers=6)
    for i, flag in enumerate(argv):
        key = flag[2:].replace("-", "_")
        if flag in ("--residual-bottom-to-top", *NORMALIZE_BEFORE):
            setattr(a, key, True)
        elif key in ("sampling_method", "enc_replace_rate", "dec_replace_rate", "encoder_layers", "decoder_layers"):
            setattr(a, key, type(getattr(a, key))(argv[i + 1]))
    return a


def built(dict_dir, argv, *extra, seed=3):
    translated = authors_argv.translate([str(dict_dir), *argv])
    arch = translated[translated.index("--arch") + 1]
    rest = [a for i, a in enumerate(translated[1:], 1) if not (a == "--arch" or translated[i - 1] == "--arch")]
    return build(dict_dir, arch, *rest, "-s", "en", "-t", "de", *SMALL, *extra, seed=seed)


@pytest.mark.parametrize("layers", [6, 18])
@pytest.mark.parametrize("word_dropout", [False, True])
@pytest.mark.parametrize("layer_type", ["b2t", "post", "pre"])
def test_the_authors_command_forms_build_the_authors_layer_type(dict_dir, layer_type, layers, word_dropout):
    argv = authors_form(layer_type, layers, word_dropout)
    model, _, args = built(dict_dir, argv)
    assert layer_types.of_model(model) == layer_type
    assert (len(model.encoder.layers), len(model.decoder.layers)) == (layers, layers)
    assert (args.word_dropout_src, args.word_dropout_tgt) == ((0.1, 0.1) if word_dropout else (0.0, 0.0))
    assert args.dropout == (0.5 if layers >= 18 else 0.3)
    # the authors' init: projections rescaled by N**-0.5 for B2T (their rescaling_init), fairseq's for the others
    plain, _, _ = built(dict_dir, argv, "--no-b2t-rescale-init")
    w, w0 = model.encoder.layers[0].fc1.weight, plain.encoder.layers[0].fc1.weight
    scale = layers ** -0.5 if layer_type == "b2t" else 1.0
    assert torch.allclose(w, w0 * scale), (layer_type, (w / w0).flatten()[:3])
    # b2t-import-checkpoint reads the same layer type from the args the fork saves for this command
    assert authors.convert_args(fork_namespace(argv)).ln_position == layer_type


def test_the_authors_flags_alone_do_not_make_b2t(dict_dir):
    """Any fork flag (here only --decay-val) takes the authors' path; the layer type still follows their code."""
    model, _, args = built(dict_dir, ["--arch", "transformer_wmt_en_de", "--decay-val", "1000"])
    assert layer_types.of_model(model) == "post" and args.b2t_rescale_init is False
    model, _, _ = built(dict_dir, ["--decay-val", "1000", "--residual-bottom-to-top"])  # 0.9's default arch
    assert layer_types.of_model(model) == "b2t"


@pytest.mark.parametrize("argv,needle", [
    (["--arch", "transformer_wmt_en_de", "--residual-bottom-to-top", *NORMALIZE_BEFORE], "adds the bottom-to-top path"),
    (["--arch", "transformer_wmt_en_de", "--decay-val", "1000", "--encoder-normalize-before"], "Pre-LN stack there"),
    (["--arch", "transformer_wmt_en_de", "--min-lr", "1e-9", "--stop-min-lr", "1e-8", "--decay-val", "1"], "give one"),
    (["--arch", "transformer_b2t", "--min-lr", "1e-9", "--stop-min-lr", "1e-8"], "give one"),
])
def test_what_no_layer_type_here_builds_is_refused(argv, needle):
    with pytest.raises(ToolError, match=needle):
        authors_argv.translate(["d", *argv])


def test_min_lr_and_stop_min_lr_that_agree_are_one(dict_dir):
    assert authors_argv.translate(["d", "--min-lr", "1e-9", "--stop-min-lr", "1e-9"]) == \
        ["d", "--stop-min-lr", "1e-9", "--stop-min-lr", "1e-9"]


@pytest.mark.parametrize("arch", ["transformer_b2t", "transformer_post_ln", "transformer_wmt_en_de"])
def test_residual_bottom_to_top_with_ln_position_post_is_refused(dict_dir, arch):
    argv = ["--arch", arch, "--residual-bottom-to-top", "--ln-position", "post", "--decay-val", "1"]
    with pytest.raises(B2TConfigError, match="contradicts --ln-position post"):
        built(dict_dir, argv)


# --- --help for every console command -----------------------------------------------------------

def console_scripts():
    """{command: "module:function"} from setup.py's entry_points, read without running setup.py."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict) and any(getattr(k, "value", None) == "console_scripts" for k in node.keys):
            specs = ast.literal_eval(node.values[[k.value for k in node.keys].index("console_scripts")])
            return {name.strip(): target.strip() for name, target in (s.split("=") for s in specs)}
    raise AssertionError("no console_scripts in setup.py")


HELP_DRIVER = r'''
import contextlib, importlib, io, json, sys, traceback
out = {}
for name, target in json.loads(sys.argv[1]).items():
    module, func = target.split(":")
    so, se, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [name, "--help"]
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        try:
            rc = getattr(importlib.import_module(module), func)()
            code = rc if isinstance(rc, int) else 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            code = -1
            traceback.print_exc()
    out[name] = {"code": code, "stdout": so.getvalue(), "stderr": se.getvalue()}
print(json.dumps(out))
'''


@pytest.mark.slow  # one process importing every command: ~40 s on the 2-core test machine
def test_every_console_command_answers_help():
    """`CMD --help` exits 0 with its usage, for each command setup.py installs (a new one is covered too);
    all in one process, as the console scripts call them (sys.argv)."""
    scripts = console_scripts()
    assert {"b2t-train", "b2t-validate", "b2t-torchrun-train"} <= set(scripts)
    p = run([sys.executable, "-c", HELP_DRIVER, json.dumps(scripts)], cwd=REPO)
    results = json.loads(p.stdout.strip().splitlines()[-1])
    for name in scripts:
        res = results[name]
        assert res["code"] == 0, (name, res["stderr"][-2000:])
        usage = "== Configuration groups ==" if name == "b2t-hydra-train" else "usage: "  # hydra's own help
        assert usage in res["stdout"], (name, res["stdout"][:500], res["stderr"][-500:])
        assert "Traceback" not in res["stderr"], (name, res["stderr"][-2000:])
