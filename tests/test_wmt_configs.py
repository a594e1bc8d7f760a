"""configs/*.yaml are what the recipe generates (b2t_tools.wmt.configs), agree with `scripts/train.sh --dry-run`,
and train through fairseq-hydra-train."""

import shlex
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, assert_one_line_error, run

from b2t_fairseq import layer_types
from b2t_fairseq import recipe as core_recipe
from b2t_tools.wmt import configs as generator
from b2t_tools.wmt import train as recipe

CONFIGS = sorted((REPO / "configs").glob("transformer_*.yaml"))  # lm_*.yaml: tests/test_lm_configs.py
SETTINGS = [(a, n) for a in recipe.ARCH_FAMILIES for n in (6, 18)]
SECTION_NAME_FLAG = {"model": "--arch", "criterion": "--criterion", "optimizer": "--optimizer",
                     "lr_scheduler": "--lr-scheduler", "task": "--task"}
NOT_HYPERPARAMETERS = {"--save-dir", "--log-format", "--log-interval", "--log-file", "--task"}


# the sizes the configs write (the architecture's; tests/test_hydra_configs.py) where the command line names none
SIZE_FLAGS = {f"--{side}-{k}" for side in ("encoder", "decoder") for k in ("layers", "embed-dim", "ffn-embed-dim",
                                                                          "attention-heads", "input-dim", "output-dim")}


# the configs write the sizes (they win over model._name's defaults): a tiny model names them as overrides
TINY_SIZES = [f"model.encoder_{k}={core_recipe.TINY[k]}" for k in ("layers", "embed_dim", "ffn_embed_dim",
                                                                  "attention_heads")]


def yaml_flags(path):
    """A hydra config as {fairseq flag: value} (True for switches), interpolations resolved, Hydra's node left out."""
    from omegaconf import OmegaConf

    from b2t_tools import hydra_configs

    hydra_configs.register_resolvers()
    cfg = OmegaConf.load(path)
    cfg.pop("hydra")
    flags = {}
    for section, body in OmegaConf.to_container(cfg, resolve=True).items():
        for key, value in body.items():
            if key == "_name":
                flags[SECTION_NAME_FLAG[section]] = str(value)
                continue
            if isinstance(value, list):
                (value,) = value
            flags["--" + key.replace("_", "-")] = value if isinstance(value, bool) else str(value)
    flags.pop("--data", None)
    return flags


def dry_run_flags(cmd_line):
    flags, words, i = {}, shlex.split(cmd_line), 0
    words = words[words.index(next(w for w in words if w.startswith("--"))):]
    while i < len(words):
        if i + 1 < len(words) and not words[i + 1].startswith("--"):
            flags[words[i]], i = words[i + 1], i + 2
        else:
            flags[words[i]], i = True, i + 1
    return flags


def _same(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    try:
        return float(a) == float(b)
    except ValueError:
        return a.replace(" ", "") == b.replace(" ", "")


def test_every_layer_type_has_its_two_configs():
    assert len(SETTINGS) == 2 * len(layer_types.LAYER_TYPES) and {"transformer_deepnorm", "transformer_admin"} <= set(recipe.ARCH_FAMILIES)
    assert sorted(p.stem for p in CONFIGS) == sorted(f"{a}_{n}l" for a, n in SETTINGS)


def test_committed_configs_are_the_generated_ones():
    """The single source: every committed YAML is byte for byte what the recipe generates."""
    want = generator.generated()
    assert sorted(want) == sorted(p.name for p in CONFIGS)
    for path in CONFIGS:
        assert path.read_text() == want[path.name], \
            f"{path.name} differs from the recipe; run python -m b2t_tools.wmt.configs --write configs/"


def test_generator_follows_the_recipe(monkeypatch):
    """Changing the recipe changes the generated YAML (so the equality above is not vacuous)."""
    before = yaml.safe_load(generator.render("transformer_deepnorm", 18))
    assert before["lr_scheduler"]["warmup_updates"] == 4000 and before["model"]["word_dropout_src"] == 0.1
    monkeypatch.setattr(recipe.recipe, "OPTIMIZATION", [(f, "8000" if f == "--warmup-updates" else v)
                                                        for f, v in core_recipe.OPTIMIZATION])
    assert yaml.safe_load(generator.render("transformer_deepnorm", 18))["lr_scheduler"]["warmup_updates"] == 8000


@pytest.mark.parametrize("arch,layers", SETTINGS)
def test_config_names_a_registered_architecture_of_its_layer_type(arch, layers):
    from argparse import Namespace

    from fairseq.models import ARCH_CONFIG_REGISTRY

    import b2t_fairseq  # noqa: F401

    name = yaml.safe_load((REPO / "configs" / f"{arch}_{layers}l.yaml").read_text())["model"]["_name"]
    args = Namespace()
    ARCH_CONFIG_REGISTRY[name](args)
    ln = next(t.key for t in layer_types.LAYER_TYPES if t.family == arch)
    assert args.ln_position == ln and args.encoder_layers == args.decoder_layers == layers


@pytest.mark.slow  # a child process or a whole pipeline: e2e
def test_check_command_finds_a_changed_or_stray_file(tmp_path):
    assert generator.main(["--write", str(tmp_path)]) == 0
    assert generator.main(["--check", str(tmp_path)]) == 0
    victim = tmp_path / "transformer_admin_18l.yaml"
    victim.write_text(victim.read_text().replace("dropout: 0.5", "dropout: 0.3"))
    (tmp_path / "extra.yaml").write_text("model: {}\n")
    p = run([sys.executable, "-m", "b2t_tools.wmt.configs", "--check", tmp_path], check=False)
    assert p.returncode == 2
    assert_one_line_error(p.stderr, "b2t_tools.wmt.configs", "transformer_admin_18l.yaml", "extra.yaml", "--write")


@pytest.mark.parametrize("arch,layers", SETTINGS)
def test_config_agrees_with_train_sh(arch, layers, capsys):
    assert recipe.main([arch, str(layers), "--gpus", "8", "--max-tokens", "3584", "--dry-run"]) == 0
    cli = {k: v for k, v in dry_run_flags(capsys.readouterr().out).items() if k not in NOT_HYPERPARAMETERS}
    cfg = {k: v for k, v in yaml_flags(REPO / "configs" / f"{arch}_{layers}l.yaml").items()
           if k not in NOT_HYPERPARAMETERS | SIZE_FLAGS}
    assert set(cfg) == set(cli), f"only in yaml: {set(cfg) - set(cli)}; only in train.sh: {set(cli) - set(cfg)}"
    diff = {k: (cfg[k], cli[k]) for k in cfg if not _same(cfg[k], cli[k])}
    assert not diff, f"configs/{arch}_{layers}l.yaml and train.sh disagree (yaml, train.sh): {diff}"
    assert cli["--update-freq"] == "16" and cli["--distributed-world-size"] == "8"


def test_the_comparison_can_fail(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs/transformer_b2t_18l.yaml").read_text().replace("warmup_updates: 4000",
                                                                                  "warmup_updates: 8000"))
    assert yaml_flags(bad)["--warmup-updates"] == "8000"
    assert not _same(yaml_flags(bad)["--warmup-updates"], "4000")


@pytest.fixture(scope="module")
def hydra_run(toy_data_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("hydra")
    p = run(["fairseq-hydra-train", "--config-dir", REPO / "configs", "--config-name", "transformer_b2t_18l",
             f"common.user_dir={REPO / 'b2t_fairseq'}", f"task.data={toy_data_bin}",
             "model._name=transformer_b2t_tiny", *TINY_SIZES, "common.fp16=false", "common.cpu=true",
             "distributed_training.distributed_world_size=1", "optimization.update_freq=[1]",
             "optimization.max_update=3", "dataset.max_tokens=512", f"checkpoint.save_dir={save}",
             "checkpoint.no_epoch_checkpoints=true", "common.log_interval=1"], cwd=save)
    return save, p.stdout + p.stderr


def test_hydra_config_trains_on_toy_data(hydra_run):
    save, log = hydra_run
    assert '"num_updates": "3"' in log or '"train_num_updates": "3"' in log
    state = torch.load(save / "checkpoint_last.pt", weights_only=True)
    model_cfg = state["cfg"]["model"]
    assert model_cfg["_name"] == "transformer_b2t_tiny" and model_cfg["ln_position"] == "b2t"
    # the size overrides (no +) reach the model, the decoder's by the config's interpolation
    assert model_cfg["encoder_layers"] == model_cfg["decoder_layers"] == 2 and model_cfg["decoder_embed_dim"] == 64
    assert state["cfg"]["optimization"]["max_update"] == 3 and state["cfg"]["criterion"]["label_smoothing"] == 0.1


def test_hydra_config_builds_b2t_layers(hydra_run):
    from fairseq import checkpoint_utils

    import b2t_fairseq  # noqa: F401

    save, log = hydra_run
    assert "B2TEncoderLayer" in log and "B2TDecoderLayer" in log  # the model fairseq-hydra-train trained
    models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task([str(save / "checkpoint_last.pt")])
    assert type(models[0].encoder.layers[0]).__name__ == "B2TEncoderLayer"
    assert models[0].encoder.cfg.word_dropout_src == 0.1  # the 18-layer config's word dropout survives


def test_b2t_hydra_train_takes_the_same_overrides_and_the_same_command_resumes(toy_data_bin, tmp_path):
    """The console command puts its plugin override after hydra's own flags; run again, the same command reads
    its checkpoint_last.pt in the config's own (relative) save_dir, not a fresh outputs/DATE/TIME folder."""
    def train(updates):
        return run(["b2t-hydra-train", "--config-dir", REPO / "configs", "--config-name", "transformer_b2t_6l",
                    f"task.data={toy_data_bin}", "model._name=transformer_b2t_tiny", *TINY_SIZES, "common.fp16=false",
                    "common.cpu=true", "distributed_training.distributed_world_size=1", "optimization.update_freq=[1]",
                    f"optimization.max_update={updates}", "dataset.max_tokens=512",
                    "checkpoint.no_epoch_checkpoints=true"], cwd=tmp_path)

    p = train(1)
    save = tmp_path / "checkpoints" / "wmt16_en_de" / "transformer_b2t_6l"
    assert "B2TEncoderLayer" in p.stdout + p.stderr and (save / "checkpoint_last.pt").exists()
    p = train(2)
    assert "Loaded checkpoint" in p.stdout + p.stderr and "@ 1 updates" in p.stdout + p.stderr
    assert torch.load(save / "checkpoint_last.pt", weights_only=True)["optimizer_history"][-1]["num_updates"] == 2
    assert not (tmp_path / "outputs").exists() and (save / ".hydra" / "config.yaml").is_file()


@pytest.mark.parametrize("config,tiny,layer", [("transformer_admin_18l", "transformer_admin_tiny", "AdminEncoderLayer")])
def test_new_layer_type_config_trains_through_hydra(config, tiny, layer, toy_data_bin, tmp_path):
    """A DeepNorm/Admin config goes through b2t-hydra-train like the paper's three (one update, tiny width)."""
    p = run(["b2t-hydra-train", "--config-dir", REPO / "configs", "--config-name", config,
             f"task.data={toy_data_bin}", f"model._name={tiny}", *TINY_SIZES, "common.fp16=false", "common.cpu=true",
             "distributed_training.distributed_world_size=1", "optimization.update_freq=[1]",
             "optimization.max_update=1", "dataset.max_tokens=512", f"checkpoint.save_dir={tmp_path}",
             "checkpoint.no_epoch_checkpoints=true"], cwd=tmp_path)
    assert layer in p.stdout + p.stderr
    state = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert state["cfg"]["model"]["ln_position"] == "admin" and state["cfg"]["model"]["dropout"] == 0.5
