"""Shared test helpers (fixtures live in conftest.py): paths, the toy corpus, running commands,
building models in-process, fairseq log parsing, the one-line error contract."""

import argparse
import copy
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import b2t_fairseq  # noqa: F401  (registers transformer_b2t)
from b2t_tools.util import parse_json_log  # noqa: F401  (re-exported for the tests)

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


def sigint_default():
    """preexec_fn for a child that a test interrupts: SIGINT's default disposition, as a terminal gives it,
    even where whoever started the tests ignores SIGINT (a background job of a non-interactive shell), which
    the child would inherit (Python then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


# --- models built in-process, exactly as fairseq-train would ---------------------------------

TINY = ["--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--encoder-attention-heads", "4",
        "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "4",
        "--encoder-layers", "3", "--decoder-layers", "2"]


def write_toy_dictionaries(folder):
    """dict.en.txt and dict.de.txt (one joined dictionary) of the toy corpus's words, written in-process:
    all a model needs to be built, so the model tests need no fairseq-preprocess run."""
    from fairseq.data import Dictionary

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    d = Dictionary()
    for w in _EN + list(_DE.values()):
        d.add_symbol(w)
    d.finalize(padding_factor=8)  # as fairseq-preprocess pads a joined dictionary
    for lang in ("en", "de"):
        d.save(str(folder / f"dict.{lang}.txt"))
    return folder


def parse(data_bin, arch, *extra):
    parser = options.get_training_parser()
    return options.parse_args_and_arch(
        parser, [str(data_bin), "--task", "translation", "--arch", arch, "--share-all-embeddings", "--cpu",
                 "--source-lang", "en", "--target-lang", "de", *extra])


def build(data_bin, arch, *extra, seed=1):
    args = parse(data_bin, arch, *extra)
    task = tasks.setup_task(args)
    torch.manual_seed(seed)
    model = task.build_model(args)
    return model, task, args


def transformer_config():
    """A TransformerConfig with an encoder and a decoder of its own. fairseq's defaults are the classes
    EncDecBaseConfig and DecoderConfig themselves (``field(default=EncDecBaseConfig)``), so setting
    ``cfg.encoder.x`` on a plain ``TransformerConfig()`` would change every later one in the process."""
    from fairseq.models.transformer.transformer_config import DecoderConfig, EncDecBaseConfig, TransformerConfig

    cfg = TransformerConfig()
    cfg.encoder, cfg.decoder = EncDecBaseConfig(), DecoderConfig()
    return cfg


def toy_batch(task, bsz=4, src_len=7, tgt_len=6, seed=0):
    """Random token ids from the task's dictionary, with some left padding on the source."""
    g = torch.Generator().manual_seed(seed)
    d = task.source_dictionary
    lo, hi = d.nspecial, len(d)
    src = torch.randint(lo, hi, (bsz, src_len), generator=g)
    src[0, :2] = d.pad()  # left-padded like fairseq's translation task
    src[:, -1] = d.eos()
    lengths = (src != d.pad()).sum(1)
    tgt = torch.randint(lo, hi, (bsz, tgt_len), generator=g)
    prev = torch.cat([torch.full((bsz, 1), d.eos()), tgt[:, :-1]], dim=1)
    return src, lengths, prev


def assert_incremental_equals_full(model, task):
    """Decoding step by step with fairseq's incremental_state gives the full-sequence decoder output."""
    model.eval()
    src, lengths, prev = toy_batch(task)
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=lengths)
        full, _ = model.decoder(prev, encoder_out=enc)
        state = {}
        steps = [model.decoder(prev[:, : t + 1], encoder_out=enc, incremental_state=state)[0]
                 for t in range(prev.size(1))]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


# --- the one-line error contract -------------------------------------------------------------

def assert_one_line_error(stderr, prog, *fragments):
    """stderr holds exactly one ``PROG: error: problem; fix`` line, no traceback; returns that line."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, stderr[-3000:]
    line = lines[0]
    assert ";" in line or f"{prog}: error: argument" in line, line  # "<problem>; <fix>" (argparse: its own)
    for f in fragments:
        assert f in line, line
    return line


# --- toy training ----------------------------------------------------------------------------

def toy_train_argv(*extra, arch="transformer_b2t_tiny", lr="0.001", max_tokens="200", json_log=True):
    """b2t-train flags for a few quick CPU updates on the toy corpus (data folder not included)."""
    argv = ["--arch", arch, "--share-all-embeddings", "--optimizer", "adam", "--lr", str(lr),
            "--max-tokens", str(max_tokens), "--seed", "1", "--num-workers", "0", "--no-progress-bar", "--cpu"]
    if json_log:
        argv += ["--log-format", "json", "--log-interval", "1"]
    return argv + [str(x) for x in extra]


def train_losses(text):
    """{update: train loss} from fairseq's json log lines (``train_inner`` records, --log-interval 1)."""
    return {int(float(rec["num_updates"])): float(rec["loss"])
            for kind, rec in parse_json_log(text.splitlines()) if kind == "train_inner"}


def train_args(data, save_dir, arch, max_update=30, *extra):
    """Data, arch and the toy flags with a warmup schedule and label smoothing (the e2e CLI tests)."""
    return [data, *toy_train_argv("--lr-scheduler", "inverse_sqrt", "--warmup-updates", "10",
                                  "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
                                  "--max-update", max_update, "--save-dir", save_dir, *extra,
                                  arch=arch, lr="5e-3", max_tokens=1000)]


# --- many command runs in one process (starting fairseq costs seconds a process) --------------

# A case may name a patch applied in the driver for that case only: what a test machine cannot do for
# real (root ignores chmod; a disk cannot be filled in a test) is simulated where the OS would answer.
DRIVER = r'''
import contextlib, errno, io, json, os, sys, traceback
import torch
import fairseq_cli.train, fairseq_cli.generate, fairseq_cli.validate, fairseq_cli.interactive
import fairseq.trainer
from b2t_tools.commands import cli

def no_space(*a, **kw):  # what f.write says on a full disk: ENOSPC, no file name
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

def file_too_big(*a, **kw):  # a file-size limit (ulimit -f) or the file system's largest file
    raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

def zip_writer_fails(*a, **kw):  # what torch's zip writer raises when a write comes up short
    raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                       "data/3: file write failed; unexpected pos 1047616 vs 1047552")

def ctrl_c(*a, **kw):
    raise KeyboardInterrupt

real_access = os.access
PATCHES = {
    "full_disk": (torch, "save", no_space),
    "file_too_big": (torch, "save", file_too_big),
    "zip_writer_fails": (torch, "save", zip_writer_fails),
    "ctrl_c": (fairseq.trainer.Trainer, "train_step", ctrl_c),
    "read_only": (os, "access", lambda p, mode, **kw: False if str(p).startswith(os.environ["RO"]) else real_access(p, mode)),
}
cases_path, out_path = sys.argv[1:3]
cases, out = json.load(open(cases_path)), {}
for name, cmd, argv, *patch in cases:
    patch = patch[0] if patch else None
    err, so, code = io.StringIO(), io.StringIO(), 0
    saved = None
    if patch:
        obj, attr, fn = PATCHES[patch]
        saved = (obj, attr, getattr(obj, attr))
        setattr(obj, attr, fn)
    sys.stdin = io.StringIO("the cat\n")
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(so):
        try:
            getattr(cli, cmd)(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            code = 1
            traceback.print_exc()
    if saved:
        setattr(*saved)
    out[name] = {"code": code, "stderr": err.getvalue(), "stdout": so.getvalue()}
with open(out_path, "w") as f:
    json.dump(out, f)
# the fake Ctrl-C leaves a torch thread that aborts the interpreter's shutdown ("terminate called without
# an active exception"); a real SIGINT to b2t-train exits 130 cleanly (measured), so skip the shutdown
os._exit(0)
'''


def run_commands_in_one_process(cases, tmp, env=None):
    """Run (name, command, argv[, patch]) cases through the b2t console functions in ONE process;
    returns {name: {"code", "stderr", "stdout"}}. A patch names an entry of PATCHES in the driver."""
    tmp = Path(tmp)
    (tmp / "cases.json").write_text(json.dumps(cases))
    (tmp / "driver.py").write_text(DRIVER)
    run([sys.executable, tmp / "driver.py", tmp / "cases.json", tmp / "out.json"], env=env or {})
    return json.loads((tmp / "out.json").read_text())


# --- independent implementations for the exactness tests ------------------------------------

def reference_attention(p, prefix, q_in, kv_in, heads, key_pad=None, causal=False):
    """Multi-head attention from raw weights; inputs are (time, batch, dim)."""
    lin = lambda x, n: F.linear(x, p[f"{prefix}.{n}.weight"], p[f"{prefix}.{n}.bias"])  # noqa: E731
    tq, b, d = q_in.shape
    tk, hd = kv_in.shape[0], d // heads
    q = lin(q_in, "q_proj") * hd ** -0.5
    k, v = lin(kv_in, "k_proj"), lin(kv_in, "v_proj")
    split = lambda x, t: x.reshape(t, b * heads, hd).transpose(0, 1)  # noqa: E731
    scores = torch.bmm(split(q, tq), split(k, tk).transpose(1, 2)).view(b, heads, tq, tk)
    if key_pad is not None:
        scores = scores.masked_fill(key_pad[:, None, None, :], float("-inf"))
    if causal:
        scores = scores + torch.triu(torch.full((tq, tk), float("-inf")), 1)
    out = torch.bmm(scores.softmax(-1).view(b * heads, tq, tk), split(v, tk))
    return lin(out.transpose(0, 1).reshape(tq, b, d), "out_proj")


# --- language models built in-process ------------------------------------------------------

SIZES = ["--decoder-embed-dim", "32", "--decoder-input-dim", "32", "--decoder-output-dim", "32",
         "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "4",
         "--decoder-layers", "3"]
DROPOUT = ["--dropout", "0.1", "--attention-dropout", "0.1", "--activation-dropout", "0.1"]
NO_DROPOUT = ["--dropout", "0", "--attention-dropout", "0"]


_CONVERTED = {}


def to_omegaconf(args):
    """fairseq's convert_namespace_to_omegaconf, composed once per distinct args in this process and
    copied after: Hydra's compose costs ~0.4 s a call, and most builds repeat one (another seed)."""
    key = repr(sorted(vars(args).items()))
    if key not in _CONVERTED:
        _CONVERTED[key] = convert_namespace_to_omegaconf(args)
    return copy.deepcopy(_CONVERTED[key])


def build_lm(data, arch, *extra, seed=1):
    """As fairseq-train builds it: argv -> args -> Hydra config (transformer_lm is a dataclass model)."""
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(data), "--task", "language_modeling", "--arch", arch,
                                                "--cpu", "--tokens-per-sample", "16", *extra])
    cfg = to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(seed)
    return task.build_model(cfg.model), task, cfg.model


# --- checkpoints in the authors' fairseq-0.9 fork format ----------------------------------------

DIMS = dict(encoder_embed_dim=32, decoder_embed_dim=32, encoder_ffn_embed_dim=64, decoder_ffn_embed_dim=64,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_layers=3, decoder_layers=2)


def fork_args(data, **over):
    """The Namespace the fork's train.py saves for the 2023 README command (tiny sizes)."""
    a = dict(
        arch="transformer_wmt_en_de", task="translation", data=str(data), source_lang="en", target_lang="de",
        left_pad_source=True, left_pad_target=False, max_source_positions=1024, max_target_positions=1024,
        dropout=0.5, attention_dropout=0.0, activation_dropout=0.0, relu_dropout=0.0, activation_fn="relu",
        encoder_embed_path=None, decoder_embed_path=None, encoder_normalize_before=False,
        decoder_normalize_before=False, encoder_learned_pos=False, decoder_learned_pos=False,
        share_all_embeddings=True, share_decoder_input_output_embed=True, no_token_positional_embeddings=False,
        adaptive_softmax_cutoff=None, adaptive_softmax_dropout=0, adaptive_input=False, no_cross_attention=False,
        cross_self_attention=False, layer_wise_attention=False, encoder_layerdrop=0, decoder_layerdrop=0,
        encoder_layers_to_keep=None, decoder_layers_to_keep=None, no_scale_embedding=False, layernorm_embedding=False,
        decoder_output_dim=32, decoder_input_dim=32,
        optimizer="adam", adam_betas="(0.9, 0.98)", adam_eps=1e-8, weight_decay=0.0, clip_norm=0.1, lr=[0.001],
        lr_scheduler="inverse_sqrt", warmup_updates=4000, warmup_init_lr=1e-07, min_lr=1e-09,
        criterion="label_smoothed_cross_entropy", label_smoothing=0.1, max_tokens=3584, update_freq=[16],
        max_update=50000, seed=1, fp16=True, keep_last_epochs=10, save_dir="model-save-dir",
        # the fork's own arguments
        residual_bottom_to_top=True, no_layer_norm=False, sampling_method="worddrop", enc_replace_rate=0.1,
        dec_replace_rate=0.1, decay_val=1000, one_emb=None, one_emb_dropout=0.5, one_emb_std=1.0, codenum=64,
        codebooknum=8, one_emb_inter_dim=0, one_emb_layernum=2, one_emb_relu_dropout=0.1, stop_relu_dropout_update=0,
        represent_length_by_lrpe=False, represent_length_by_ldpe=False, ordinary_sinpos=False,
    )
    a.update(DIMS)
    a.update(over)
    return argparse.Namespace(**a)


def fork_weights(data, seed=0, dtype=torch.float32):
    """A stock transformer's state dict with random weights (LayerNorms too), under the fork's key names."""
    stock, _, _ = build(data, "transformer", *TINY)
    g = torch.Generator().manual_seed(seed)
    sd, shared = {}, {}
    for k, v in stock.state_dict().items():
        if k == "decoder.output_projection.weight":
            continue  # fairseq 0.9 projects with the (shared) embedding matrix itself: no such key
        if torch.is_floating_point(v) and not k.endswith("version"):
            if v.data_ptr() not in shared:  # one tensor under several names (shared embeddings)
                shared[v.data_ptr()] = (torch.randn(v.shape, generator=g) * 0.3
                                        + (1.0 if "layer_norm.weight" in k else 0.0)).to(dtype)
            v = shared[v.data_ptr()]
        sd[k.replace("decoder.embed_positions.", "decoder.embed_positions_original.")] = v
    sd["encoder.embed_positions._float_tensor"] = torch.FloatTensor(1)
    sd["decoder.embed_positions_original._float_tensor"] = torch.FloatTensor(1)
    return sd


def write_fork_checkpoint(path, data, dtype=torch.float32, seed=0, **over):
    state = {"args": fork_args(data, **over), "model": fork_weights(data, seed, dtype),
             "optimizer_history": [{"criterion_name": "LabelSmoothedCrossEntropyCriterion",
                                    "optimizer_name": "FairseqAdam", "lr_scheduler_state": {"best": 3.9},
                                    "num_updates": 50000}],
             "extra_state": {"epoch": 41, "val_loss": 3.9, "train_iterator": {"epoch": 41, "iterations_in_epoch": 0}},
             "last_optimizer_state": {"state": {}, "param_groups": [{"lr": 2.8e-4, "params": [0]}]}}
    torch.save(state, path, _use_new_zipfile_serialization=False)  # torch 1.4's format
    return state
