"""--log-layer-norms (b2t_fairseq/patches/layer_monitor.py): the logged per-layer numbers equal the same
quantities computed here from the model, and a diverging run stops with one line naming a layer."""

import inspect
import re

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.trainer import Trainer
from helpers import assert_one_line_error, parse_json_log, run, write_toy_corpus

from b2t_fairseq.patches import layer_monitor

pytestmark = pytest.mark.slow


def test_relies_on_fairseq_names():
    layer_monitor.install()
    assert list(inspect.signature(Trainer.train_step).parameters) == ["self", "samples", "raise_oom"]
    assert list(inspect.signature(Trainer.clip_grad_norm).parameters) == ["self", "clip_norm"]
    assert list(inspect.signature(checkpoint_utils.save_checkpoint).parameters) == [
        "cfg", "trainer", "epoch_itr", "val_loss"]
    before = Trainer.train_step
    layer_monitor.install()  # a second install wraps nothing twice
    assert Trainer.train_step is before


def _one_batch_data(tmp_path):
    """64 training sentences, one batch per epoch: update 2 sees the same batch as update 1."""
    raw = write_toy_corpus(tmp_path / "raw", sizes=(("train", 64), ("valid", 16)))
    run(["fairseq-preprocess", "--source-lang", "en", "--target-lang", "de", "--trainpref", raw / "train",
         "--validpref", raw / "valid", "--destdir", tmp_path / "bin", "--joined-dictionary", "--workers", "1"])
    return tmp_path / "bin"


def _own_numbers(ckpt, data):
    """Gradient norms, input-gradient norms and largest activations of each layer, measured here."""
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(ckpt)], arg_overrides={"data": str(data)})
    model = models[0]
    model.train()
    task.load_dataset("train")
    itr = task.get_batch_iterator(task.dataset("train"), max_tokens=100000, required_batch_size_multiple=1)
    (sample,) = list(itr.next_epoch_itr(shuffle=False))
    layers = [(f"enc{i:02d}", m) for i, m in enumerate(model.encoder.layers)] + \
             [(f"dec{i:02d}", m) for i, m in enumerate(model.decoder.layers)]
    inputs, amax, handles = {}, {}, []
    for name, layer in layers:
        def keep_input(mod, args, name=name):
            args[0].retain_grad()
            inputs[name] = args[0]
        handles.append(layer.register_forward_pre_hook(keep_input))
        for sub in layer.modules():
            def biggest(mod, args, out, name=name):
                ts = [t for t in list(args) + list(out if isinstance(out, tuple) else [out]) if torch.is_tensor(t) and t.is_floating_point()]
                amax[name] = max([amax.get(name, 0.0)] + [t.detach().abs().max().item() for t in ts])
            handles.append(sub.register_forward_hook(biggest))
    criterion = task.build_criterion(cfg.criterion)
    loss, sample_size, _ = criterion(model, sample)
    (loss / sample_size).backward()
    out = {}
    for name, layer in layers:
        out[f"{name}_gnorm"] = torch.cat([p.grad.flatten() for p in layer.parameters()]).norm().item()
        out[f"{name}_ingrad"] = inputs[name].grad.norm().item()
        out[f"{name}_amax"] = amax[name]
    return out


def test_logged_numbers_match_the_model(tmp_path):
    data = _one_batch_data(tmp_path)
    save = tmp_path / "ck"
    p = run(["b2t-train", data, "--arch", "transformer_b2t_tiny", "--encoder-layers", "3", "--decoder-layers", "2",
             "--share-all-embeddings", "--optimizer", "adam", "--lr", "0.003", "--dropout", "0",
             "--max-tokens", "100000", "--required-batch-size-multiple", "1", "--seed", "1", "--num-workers", "0",
             "--no-progress-bar", "--cpu", "--log-format", "json", "--log-interval", "2", "--max-update", "2",
             "--save-dir", save, "--log-layer-norms"])
    logged = [rec for kind, rec in parse_json_log(p.stderr.splitlines() + p.stdout.splitlines())
              if kind == "train_inner"]
    assert [int(r["num_updates"]) for r in logged] == [2]  # every --log-interval updates, not more
    # update 2's gradient was taken at the weights saved after update 1 (checkpoint1.pt), on the same batch
    own = _own_numbers(save / "checkpoint1.pt", data)
    assert len(own) == 3 * 5
    for key, value in own.items():
        assert float(logged[0][key]) == pytest.approx(value, rel=2e-4), key
    assert float(logged[0]["amax"]) == pytest.approx(max(v for k, v in own.items() if k.endswith("_amax")), rel=1e-5)


def test_divergence_is_named_and_the_last_checkpoint_kept(tmp_path):
    data = tmp_path / "bin"
    raw = write_toy_corpus(tmp_path / "raw", sizes=(("train", 200), ("valid", 20)))
    run(["fairseq-preprocess", "--source-lang", "en", "--target-lang", "de", "--trainpref", raw / "train",
         "--validpref", raw / "valid", "--destdir", data, "--joined-dictionary", "--workers", "1"])
    save = tmp_path / "ck"
    common = [data, "--arch", "transformer_post_ln_tiny", "--encoder-layers", "6", "--decoder-layers", "6",
              "--share-all-embeddings", "--optimizer", "adam", "--dropout", "0", "--max-tokens", "500",
              "--seed", "1", "--num-workers", "0", "--no-progress-bar", "--cpu", "--log-format", "json",
              "--log-interval", "1", "--save-dir", save, "--no-epoch-checkpoints"]
    run(["b2t-train", *common, "--lr", "0.003", "--max-update", "6"])
    good = torch.load(save / "checkpoint_last.pt", weights_only=False)
    assert good["optimizer_history"][-1]["num_updates"] == 6
    # the same run goes on at lr 10: it diverges within a few updates; with every epoch (~3 updates)
    # ending in a save, the diverged state would overwrite checkpoint_last.pt if nothing kept it
    p = run(["b2t-train", *common, "--lr", "10", "--max-update", "40", "--log-layer-norms",
             "--divergence-patience", "6"], check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    line = assert_one_line_error(p.stderr, "b2t-train", "training diverged at update", "layer", "--layer-type b2t")
    assert any(f"{side} layer" in line for side in ("encoder", "decoder")), line
    last = torch.load(save / "checkpoint_last.pt", weights_only=False)  # loadable, and still the good state
    assert last["optimizer_history"][-1]["num_updates"] == 6
    assert all(torch.equal(last["model"][k], v) for k, v in good["model"].items())
    p = run(["b2t-train", *common, "--lr", "10", "--max-update", "12", "--log-layer-norms",
             "--divergence-patience", "6", "--on-divergence", "warn"], check=False)
    # a warning is a log line, and fairseq's log goes to stdout
    assert p.returncode == 0 and "training diverged at update" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]


def test_the_last_save_is_never_held_back(tmp_path):
    """A run whose loss left the unigram level near its end still saves its final state (it used to exit 0
    with checkpoint_last.pt some updates short, and again on every re-run)."""
    data = _one_batch_data(tmp_path)
    save = tmp_path / "ck"
    common = [data, "--arch", "transformer_post_ln_tiny", "--encoder-layers", "2", "--decoder-layers", "2",
              "--share-all-embeddings", "--optimizer", "adam", "--dropout", "0", "--max-tokens", "100000",
              "--required-batch-size-multiple", "1", "--seed", "1", "--num-workers", "0", "--no-progress-bar",
              "--cpu", "--log-format", "json", "--log-interval", "1", "--save-dir", save, "--no-epoch-checkpoints"]
    run(["b2t-train", *common, "--lr", "0.003", "--max-update", "6"])
    # on at lr 10: the loss leaves the unigram level and the norms jump, so the saves after that are held
    # back (patience 50 is never reached) -- but not the last one
    p = run(["b2t-train", *common, "--lr", "10", "--max-update", "9", "--log-layer-norms",
             "--divergence-patience", "50"])
    last = torch.load(save / "checkpoint_last.pt", weights_only=False)
    assert last["optimizer_history"][-1]["num_updates"] == 9
    out = p.stderr + p.stdout
    assert re.search(r"not saving a checkpoint at update [78]\b", out), out[-3000:]
    assert "saving the run's final state at update 9" in out
