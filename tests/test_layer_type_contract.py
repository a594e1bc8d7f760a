"""One contract over every layer-type record: what a new record must do to belong.

For each type, translation and language model alike: the model builds from its named architecture
and is recognised as that type, trains two updates, decodes incrementally exactly as the full forward,
round-trips a checkpoint, is refused by a model of another type, and appears in every tool's choices.
"""

import argparse

import pytest
import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils
from fairseq.models import ARCH_MODEL_REGISTRY
from omegaconf import OmegaConf
from helpers import REPO, SIZES, TINY, assert_incremental_equals_full, build, build_lm, to_omegaconf, toy_batch

from b2t_fairseq import layer_types
from b2t_fairseq.errors import B2TError
from b2t_tools.analysis import bench, stability
from b2t_tools.demo import cli as demo_cli

TYPES = layer_types.LAYER_TYPES
IDS = [t.key for t in TYPES]


def _translation(toy_dicts, t, seed=1, *extra):
    return build(toy_dicts, t.family + "_tiny", *TINY, "--dropout", "0", *extra, seed=seed)


def _lm(lm_dict_dir, t, seed=1, *extra):
    return build_lm(lm_dict_dir, t.lm_family + "_tiny", *SIZES, "--dropout", "0", *extra, seed=seed)


def _lm_tokens(task, bsz=3, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = task.source_dictionary
    return torch.randint(d.nspecial, len(d), (bsz, length), generator=g)


HISTORY = [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam", "lr_scheduler_state": {"best": None},
            "num_updates": 0}]


def _save(path, args, model):
    """A checkpoint as fairseq-train writes one (the fields its loader reads): the config as a plain
    container, converted once here; a saved Namespace would be converted by Hydra at every load (~0.9 s)."""
    cfg = OmegaConf.to_container(to_omegaconf(args))
    torch.save({"cfg": cfg, "model": model.state_dict(), "extra_state": {}, "optimizer_history": HISTORY}, path)


def _train_two_updates(model, loss_of):
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    moved = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert moved == len(before), f"{len(before) - moved} parameters did not train"


def _translation_loss(task):
    src, lengths, prev = toy_batch(task)
    return lambda m: F.cross_entropy(m(src, lengths, prev)[0].flatten(0, 1), prev.roll(-1, 1).flatten())


@pytest.mark.parametrize("t", TYPES, ids=IDS)
def test_translation_contract(toy_dicts, tmp_path, t):
    model, task, args = _translation(toy_dicts, t)
    assert args.ln_position == t.key and layer_types.which(model) is t and layer_types.which(args) is t
    _train_two_updates(model, _translation_loss(task))
    assert_incremental_equals_full(model, task)

    # a checkpoint written as fairseq writes one round-trips through fairseq's own loader
    path = tmp_path / "checkpoint.pt"
    _save(path, args, model)
    assert layer_types.which(torch.load(path, weights_only=False)) is t
    [loaded], _, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={"data": str(toy_dicts)})
    assert layer_types.which(loaded) is t
    model.eval(), loaded.eval()
    batch = toy_batch(task)
    with torch.no_grad():
        assert torch.equal(model(*batch)[0], loaded(*batch)[0])


@pytest.mark.parametrize("t", TYPES, ids=IDS)
def test_lm_contract(lm_dict_dir, tmp_path, t):
    model, task, cfg = _lm(lm_dict_dir, t)
    assert layer_types.which(model) is t and layer_types.which(cfg) is t
    toks = _lm_tokens(task)
    _train_two_updates(model, lambda m: F.cross_entropy(m(toks)[0][:, :-1].flatten(0, 1), toks[:, 1:].flatten()))
    model.eval()
    with torch.no_grad():
        full, _ = model(toks)
        state = {}
        steps = [model.decoder(toks[:, : i + 1], incremental_state=state)[0] for i in range(toks.size(1))]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)

    path = tmp_path / "checkpoint.pt"
    # as fairseq saves a config: a plain container
    checkpoint_utils.torch_persistent_save({"cfg": {"model": OmegaConf.to_container(cfg)}, "model": model.state_dict(),
                                            "optimizer_history": HISTORY, "extra_state": {}}, str(path))
    state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert layer_types.which(state) is t
    again, _, _ = _lm(lm_dict_dir, t, seed=7)
    again.load_state_dict(state["model"])
    again.eval()
    with torch.no_grad():
        assert torch.equal(full, again(toks)[0])


def _other_type_overrides(other):
    # the flags a command line would change to build another type from the same saved args (the
    # normalize-before switches too: a Pre-LN-like type's saved args hold them on)
    return {"ln_position": other.key, "residual_bottom_to_top": False, "b2t_rescale_init": False,
            "encoder_normalize_before": other.normalize_before, "decoder_normalize_before": other.normalize_before}


@pytest.mark.parametrize("t", [t for t in TYPES if t.own_layers], ids=[t.key for t in TYPES if t.own_layers])
def test_a_checkpoint_is_refused_by_every_other_types_model(toy_dicts, tmp_path, t):
    model, _, args = _translation(toy_dicts, t)
    path = tmp_path / "checkpoint.pt"
    _save(path, args, model)
    for other in TYPES:
        if other is t:
            continue
        with pytest.raises(B2TError, match=f"{t.label} model|does not fit"):
            checkpoint_utils.load_model_ensemble_and_task(
                [str(path)], arg_overrides={"data": str(toy_dicts), **_other_type_overrides(other)})


def test_fairseqs_own_post_ln_may_start_any_type(toy_dicts, tmp_path):
    """The documented exception: Post-LN weights (a stock checkpoint's) initialize any type, to fine-tune it."""
    model, _, args = _translation(toy_dicts, layer_types.BY_KEY["post"])
    path = tmp_path / "checkpoint.pt"
    _save(path, args, model)
    [loaded], _, _ = checkpoint_utils.load_model_ensemble_and_task(
        [str(path)], arg_overrides={"data": str(toy_dicts), **_other_type_overrides(layer_types.BY_KEY["b2t"])})
    assert layer_types.which(loaded).key == "b2t"


@pytest.mark.parametrize("t", TYPES, ids=IDS)
def test_every_tool_offers_the_type(t):
    for suffix in ("", "_18l", "_tiny"):
        assert ARCH_MODEL_REGISTRY.get(t.family + suffix) is not None
    for suffix in ("_gpt", "_16l", "_tiny"):
        assert ARCH_MODEL_REGISTRY.get(t.lm_family + suffix) is not None
    assert f"plugin_{t.short}" in bench.VARIANTS and f"plugin_{t.short}" in bench.LM_VARIANTS
    demo = demo_cli.resolve_config(demo_cli.get_parser().parse_args(["--archs", t.short]))
    assert list(demo.archs) == [t.short]
    sweep = stability.resolve(stability.get_parser().parse_args(["--layer-types", t.short]))
    assert sweep.types == [t.short]
    for name in (f"transformer_{t.short}_6l.yaml", f"transformer_{t.short}_18l.yaml",
                 f"lm_{t.short}_6l.yaml", f"lm_{t.short}_16l.yaml"):
        assert (REPO / "configs" / name).is_file(), name


@pytest.mark.parametrize("t", TYPES, ids=IDS)
def test_which_reads_saved_args_of_every_form(t):
    ns = argparse.Namespace(arch=t.family, ln_position=t.key)
    assert layer_types.which(ns) is t
    assert layer_types.which({"args": ns, "model": {}}) is t
    assert layer_types.which({"cfg": {"model": {"_name": t.lm_family + "_tiny", "ln_position": t.key}}}) is t
    # before any flag is settled, the named architecture tells the type
    assert layer_types.which(argparse.Namespace(arch=t.lm_family + "_16l")) is t
