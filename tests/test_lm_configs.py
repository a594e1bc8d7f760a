"""configs/lm_*.yaml are what the LM recipe generates (b2t_tools.lm.configs), agree with `b2t-lm-train --dry-run`,
name the right layer type, and train through b2t-hydra-train."""

from argparse import Namespace

import pytest
import torch
import yaml
from helpers import REPO, assert_one_line_error, run
from test_wmt_configs import SIZE_FLAGS, _same, dry_run_flags, yaml_flags

from b2t_fairseq import layer_types
from b2t_fairseq import recipe as core_recipe
from b2t_tools.lm import configs as lm_configs
from b2t_tools.lm import train as lm_train
from b2t_tools.wmt import configs as generator

LM_CONFIGS = sorted((REPO / "configs").glob("lm_*.yaml"))
SETTINGS = [(t.lm_family, n) for t in layer_types.LAYER_TYPES for n in core_recipe.LM_DEPTHS]
NOT_HYPERPARAMETERS = {"--save-dir", "--log-format", "--log-interval", "--criterion"}


def config(arch, layers):
    return REPO / "configs" / lm_configs.file_name(arch, layers)


def test_every_layer_type_has_its_lm_configs_and_they_are_the_generated_ones():
    assert len(SETTINGS) == len(core_recipe.LM_DEPTHS) * len(layer_types.LAYER_TYPES) and sorted(lm_configs.settings()) == sorted(SETTINGS)
    want = lm_configs.generated()
    assert sorted(want) == sorted(p.name for p in LM_CONFIGS) == sorted(f"lm_{t.short}_{n}l.yaml" for t in
                                                                       layer_types.LAYER_TYPES
                                                                       for n in core_recipe.LM_DEPTHS)
    for path in LM_CONFIGS:
        assert path.read_text() == want[path.name], \
            f"{path.name} differs from the recipe; run python -m b2t_tools.wmt.configs --write configs/"


@pytest.mark.parametrize("arch,layers", SETTINGS)
def test_lm_config_agrees_with_b2t_lm_train(arch, layers, tmp_path, capsys):
    (tmp_path / "dict.txt").write_text("w 1\n")
    assert lm_train.main([str(tmp_path), "--arch", arch, "--layers", str(layers), "--gpus", "2", "--dry-run"]) == 0
    words = capsys.readouterr().out.split()
    cli = {k: v for k, v in dry_run_flags(" ".join(words[2:])).items() if k not in NOT_HYPERPARAMETERS}
    cfg = {k: v for k, v in yaml_flags(config(arch, layers)).items()
           if k not in NOT_HYPERPARAMETERS | (SIZE_FLAGS - {"--decoder-layers"})}
    assert set(cfg) == set(cli), f"only in yaml: {set(cfg) - set(cli)}; only in b2t-lm-train: {set(cli) - set(cfg)}"
    diff = {k: (cfg[k], cli[k]) for k in cfg if not _same(cfg[k], cli[k])}
    assert not diff, f"{config(arch, layers).name} and b2t-lm-train disagree (yaml, b2t-lm-train): {diff}"
    # the recipe's tokens per update: 2 GPUs x 2048 x 16
    assert int(cli["--update-freq"]) * 2 * int(cli["--max-tokens"]) == core_recipe.LM_TOKENS_PER_UPDATE
    assert yaml.safe_load(config(arch, layers).read_text())["criterion"]["_name"] == "cross_entropy"


@pytest.mark.parametrize("arch,layers", SETTINGS)
def test_lm_config_names_a_registered_architecture_of_its_layer_type(arch, layers):
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

    import b2t_fairseq  # noqa: F401

    model = yaml.safe_load(config(arch, layers).read_text())["model"]
    assert ARCH_MODEL_REGISTRY[model["_name"]].__name__ == "TransformerLMB2TModel"
    args = Namespace(decoder_layers=model["decoder_layers"])
    ARCH_CONFIG_REGISTRY[model["_name"]](args)
    want = next(t.key for t in layer_types.LAYER_TYPES if t.lm_family == arch)
    assert (getattr(args, "ln_position", None) or "b2t") == want and args.decoder_layers == layers


def test_lm_generator_follows_the_recipe(monkeypatch):
    assert yaml.safe_load(lm_configs.render("transformer_lm_b2t", 16))["optimization"]["lr"] == [0.0005]
    monkeypatch.setattr(core_recipe, "LM_OPTIMIZATION", [(f, "0.001" if f == "--lr" else v)
                                                        for f, v in core_recipe.LM_OPTIMIZATION])
    assert yaml.safe_load(lm_configs.render("transformer_lm_b2t", 16))["optimization"]["lr"] == [0.001]


def test_check_command_covers_the_lm_configs(tmp_path, capsys):
    assert generator.main(["--write", str(tmp_path)]) == 0
    assert generator.main(["--check", str(tmp_path)]) == 0
    victim = tmp_path / "lm_b2t_16l.yaml"
    victim.write_text(victim.read_text().replace("warmup_updates: 4000", "warmup_updates: 8000"))
    capsys.readouterr()
    assert generator.main(["--check", str(tmp_path)]) == 2
    assert_one_line_error(capsys.readouterr().err, "b2t_tools.wmt.configs", "lm_b2t_16l.yaml", "--write")


@pytest.mark.slow  # a child process or a whole pipeline: e2e
def test_lm_config_trains_through_hydra(tmp_path):
    """lm_b2t_16l.yaml through b2t-hydra-train on a freshly binarized toy corpus (tiny width, one update)."""
    from helpers import write_toy_corpus

    raw = write_toy_corpus(tmp_path / "raw")
    run(["fairseq-preprocess", "--only-source", "--trainpref", raw / "train.en", "--validpref", raw / "valid.en",
         "--destdir", tmp_path / "bin", "--workers", "1"])
    save = tmp_path / "ck"
    p = run(["b2t-hydra-train", "--config-dir", REPO / "configs", "--config-name", "lm_b2t_16l",
             f"task.data={tmp_path / 'bin'}", "model._name=transformer_lm_b2t_tiny",
             *[f"model.{k}={core_recipe.LM_TINY[k]}" for k in ("decoder_embed_dim", "decoder_ffn_embed_dim",
                                                               "decoder_attention_heads")], "common.fp16=false",
             "common.cpu=true", "distributed_training.distributed_world_size=1", "optimization.update_freq=[1]",
             "optimization.max_update=1", "task.tokens_per_sample=32", "dataset.max_tokens=64",
             f"checkpoint.save_dir={save}", "checkpoint.no_epoch_checkpoints=true"], cwd=tmp_path)
    assert "B2TDecoderLayer" in p.stdout + p.stderr
    state = torch.load(save / "checkpoint_last.pt", weights_only=True)
    model = state["cfg"]["model"]
    assert model["decoder_layers"] == 16 and model["share_decoder_input_output_embed"] is True
    assert state["cfg"]["task"]["_name"] == "language_modeling"

