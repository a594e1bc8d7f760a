"""b2t-export: a plugin Post-LN/Pre-LN checkpoint loads and decodes in a process where the plugin cannot be
imported (no --user-dir, the b2t packages blocked, checked in sys.modules), with outputs equal to the
plugin's; a plugin checkpoint loads through fairseq's hub with user_dir."""

import json
import sys

import pytest
import torch
from fairseq.modules.transformer_layer import TransformerEncoderLayerBase
from helpers import REPO, run, toy_train_argv

from b2t_fairseq.patches.encoder_fast_path import has_fast_path

STOCK_FAST_PATH = has_fast_path(TransformerEncoderLayerBase)  # upstream fairseq 0.12.2

# Loads a checkpoint with fairseq's own loader and prints its outputs on fixed inputs (json). "stock":
# the plugin cannot be imported; "plugin": it is imported first, as --user-dir would.
CHILD = r'''
import importlib.abc, json, sys
mode, path, data, kind = sys.argv[1:5]
PLUGIN = ("b2t_fairseq", "b2t_tools")

class NoPlugin(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PLUGIN:
            raise ModuleNotFoundError(f"No module named {name!r}")

if mode == "stock":
    sys.meta_path.insert(0, NoPlugin())
else:
    import b2t_fairseq  # noqa: F401
import torch
from fairseq import checkpoint_utils
from fairseq.sequence_generator import SequenceGenerator

torch.manual_seed(0)
models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
model = models[0].eval()
d = task.source_dictionary
g = torch.Generator().manual_seed(0)
tokens = torch.randint(d.nspecial, len(d), (3, 7), generator=g)
tokens[:, -1] = d.eos()
out = {"arch": cfg.model._name if hasattr(cfg.model, "_name") else None,
       "model_class": type(model).__module__ + "." + type(model).__name__}
with torch.no_grad():
    if kind == "mt":
        tokens[0, :2] = d.pad()  # left padding, as the translation task batches
        lengths = (tokens != d.pad()).sum(1)
        prev = torch.cat([torch.full((3, 1), d.eos()), tokens[:, :-1].clamp(min=d.nspecial)], 1)
        out["logits"] = model(tokens, lengths, prev)[0].tolist()
        gen = SequenceGenerator([model], task.target_dictionary, beam_size=2, max_len_b=10)
        hyps = gen.forward({"net_input": {"src_tokens": tokens, "src_lengths": lengths}})
        out["hyps"] = [h[0]["tokens"].tolist() for h in hyps]
        out["scores"] = [float(h[0]["score"]) for h in hyps]
    else:
        out["logits"] = model(tokens)[0].tolist()
out["plugin_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in PLUGIN)
print(json.dumps(out))
'''


def child(tmp_path, mode, ckpt, data, kind):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    # no PYTHONPATH and cwd outside the checkout: the stock child gets the plugin from nowhere
    p = run([sys.executable, script, mode, ckpt, data, kind], cwd=tmp_path, env={"PYTHONPATH": ""})
    return json.loads(p.stdout.strip().splitlines()[-1])


def train_mt(tmp_path, data, ln):
    run(["b2t-train", data, *toy_train_argv("--ln-position", ln, "--max-update", 4, "--save-dir", tmp_path / "ck",
                                            "--no-epoch-checkpoints", max_tokens=500, json_log=False)])
    return tmp_path / "ck/checkpoint_last.pt"


def export(src, dst, check=True):
    return run([sys.executable, "-m", "b2t_tools.commands.export", src, dst], check=check, cwd=REPO)


@pytest.mark.parametrize("ln", ["post", "pre"])
def test_exported_translation_model_runs_in_stock_fairseq(tmp_path, toy_data_bin, ln):
    ckpt = train_mt(tmp_path, toy_data_bin, ln)
    p = export(ckpt, tmp_path / "stock.pt")
    assert "arch transformer," in p.stdout
    if ln == "post" and STOCK_FAST_PATH:
        # without the plugin's repair, upstream 0.12.2 runs any loaded Post-LN encoder through torch's fused
        # path, which fails on a padded batch (fairseq issues #4858, #4899): fairseq's bug, not the export's
        (tmp_path / "child.py").write_text(CHILD)
        p = run([sys.executable, tmp_path / "child.py", "stock", tmp_path / "stock.pt", toy_data_bin, "mt"],
                check=False, cwd=tmp_path, env={"PYTHONPATH": ""})
        assert p.returncode != 0 and "_transformer_encoder_layer_fwd" in p.stderr
        pytest.xfail("stock fairseq 0.12.2 cannot run a loaded Post-LN encoder on padded batches (#4858, #4899)")
    stock = child(tmp_path, "stock", tmp_path / "stock.pt", toy_data_bin, "mt")
    plugin = child(tmp_path, "plugin", ckpt, toy_data_bin, "mt")
    assert stock["plugin_modules"] == [] and plugin["plugin_modules"], (stock, plugin["plugin_modules"])
    assert stock["arch"] == "transformer" and stock["model_class"].startswith("fairseq.models.transformer")
    assert plugin["model_class"].startswith("b2t_fairseq")
    assert stock["hyps"] == plugin["hyps"] and all(len(h) > 1 for h in stock["hyps"])
    torch.testing.assert_close(torch.tensor(stock["scores"]), torch.tensor(plugin["scores"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(stock["logits"]), torch.tensor(plugin["logits"]), rtol=0, atol=1e-6)


def test_exported_language_model_runs_in_stock_fairseq(tmp_path):
    from helpers import write_toy_corpus

    raw = write_toy_corpus(tmp_path / "raw")
    run(["fairseq-preprocess", "--only-source", "--trainpref", raw / "train.en", "--validpref", raw / "valid.en",
         "--destdir", tmp_path / "bin", "--workers", "1"])
    run(["b2t-train", tmp_path / "bin", "--task", "language_modeling", "--arch", "transformer_lm_post_ln_tiny",
         "--tokens-per-sample", "32", "--optimizer", "adam", "--lr", "0.001", "--max-tokens", "256",
         "--max-update", "4", "--seed", "1", "--num-workers", "0", "--no-progress-bar", "--cpu",
         "--no-epoch-checkpoints", "--save-dir", tmp_path / "ck"])
    ckpt = tmp_path / "ck/checkpoint_last.pt"
    p = export(ckpt, tmp_path / "stock.pt")
    assert "arch transformer_lm," in p.stdout and "Post-LN" in p.stdout
    stock = child(tmp_path, "stock", tmp_path / "stock.pt", tmp_path / "bin", "lm")
    plugin = child(tmp_path, "plugin", ckpt, tmp_path / "bin", "lm")
    assert stock["plugin_modules"] == [] and stock["arch"] == "transformer_lm"
    # Post-LN survives the export (fairseq's named LM architectures would force Pre-LN)
    torch.testing.assert_close(torch.tensor(stock["logits"]), torch.tensor(plugin["logits"]), rtol=0, atol=1e-6)


def test_b2t_checkpoint_is_refused_in_one_line_and_loads_through_the_hub(tmp_path, toy_data_bin):
    from helpers import assert_one_line_error

    ckpt = train_mt(tmp_path, toy_data_bin, "b2t")
    p = export(ckpt, tmp_path / "stock.pt", check=False)
    assert p.returncode == 2
    assert_one_line_error(p.stderr, "b2t-export", "is a B2T model", "--user-dir b2t_fairseq")
    assert not (tmp_path / "stock.pt").exists()

    # the documented Python route for a plugin checkpoint: fairseq's hub with user_dir
    from fairseq.models.transformer import TransformerModel

    from b2t_fairseq.layer_types import of_model

    hub = TransformerModel.from_pretrained(str(ckpt.parent), checkpoint_file=ckpt.name,
                                           data_name_or_path=str(toy_data_bin), user_dir=str(REPO / "b2t_fairseq"))
    assert of_model(hub.models[0]) == "b2t"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    # fairseq 0.12.2 only: a never-initialized position buffer, and the fused path's copies of each encoder
    # layer's weights, which its loader rebuilds from q/k/v and fc1/fc2 (unused: patches/encoder_fast_path.py)
    fused_copies = {f"{w}_{t}" for w in ("in_proj", "out_proj", "fc1", "fc2") for t in ("weight", "bias")}
    for k, v in hub.models[0].state_dict().items():
        if not (k.endswith("._float_tensor") or (k.startswith("encoder.layers.") and k.count(".") == 3
                                                  and k.rsplit(".", 1)[1] in fused_copies)):
            assert torch.equal(v, saved[k]), k
    words = hub.translate("the cat sees a dog", beam=2).split()
    assert words and set(words) <= set(hub.tgt_dict.symbols)
