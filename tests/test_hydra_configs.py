"""The Hydra configs take the GPU count and the sizes as plain overrides, run in the current folder (so the same
command resumes), and b2t-hydra-train reports Hydra's errors in one line. Composed in-process with Hydra and
fairseq's config store, as fairseq-hydra-train composes them; the committed files are the generator's output
(tests/test_wmt_configs.py, tests/test_lm_configs.py)."""

import pytest
from helpers import REPO, assert_one_line_error
from omegaconf import OmegaConf

from b2t_tools import hydra_configs
from b2t_tools.errors import ToolError


def compose(name, overrides=()):
    """configs/NAME.yaml with the overrides, as fairseq-hydra-train composes it (resolved, Hydra's node kept)."""
    from fairseq.dataclass.initialize import hydra_init
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    hydra_configs.register_resolvers()
    hydra_init(name)  # fairseq's dataclasses under the config's name, as fairseq_cli/hydra_train.py does
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.1"):
        cfg = hydra_compose(config_name=name, overrides=list(overrides), return_hydra_config=True)
    return cfg


@pytest.mark.parametrize("name,gpus,freq", [("transformer_b2t_18l", 4, 32), ("transformer_b2t_18l", 16, 8),
                                            ("lm_b2t_6l", 1, 32), ("lm_b2t_6l", 8, 4)])
def test_gpu_count_override_keeps_the_recipe_tokens_per_update(name, gpus, freq):
    cfg = compose(name, [f"distributed_training.distributed_world_size={gpus}"])
    assert cfg.distributed_training.distributed_world_size == gpus
    assert list(cfg.optimization.update_freq) == [freq]
    per_update = 458752 if name.startswith("transformer") else 65536
    assert gpus * cfg.dataset.max_tokens * freq == per_update
    assert list(compose(name).optimization.update_freq) == [16]  # the recipe's own setting, unchanged


def test_max_tokens_override_moves_update_freq_and_an_uneven_split_is_one_line():
    cfg = compose("transformer_pre_ln_6l", ["distributed_training.distributed_world_size=2", "dataset.max_tokens=4096"])
    assert list(cfg.optimization.update_freq) == [56]
    cfg = compose("transformer_pre_ln_6l", ["distributed_training.distributed_world_size=3"])
    with pytest.raises(Exception) as e:
        OmegaConf.to_container(cfg.optimization, resolve=True)
    cause = e.value
    while cause is not None and not isinstance(cause, ToolError):
        cause = cause.__cause__ or cause.__context__
    assert cause is not None and "use a number of GPUs that divides 458752 (e.g. 2 or 4 processes)" in str(cause)


def test_size_overrides_need_no_plus_and_the_decoder_follows():
    cfg = compose("transformer_deepnorm_6l", ["model.encoder_layers=12", "model.encoder_embed_dim=256",
                                              "model.encoder_attention_heads=4"])
    m = cfg.model
    assert (m.encoder_layers, m.decoder_layers, m.encoder_embed_dim, m.decoder_embed_dim) == (12, 12, 256, 256)
    assert m.decoder_attention_heads == 4 and m.encoder_ffn_embed_dim == m.decoder_ffn_embed_dim == 2048
    m = compose("transformer_deepnorm_6l", ["model.encoder_layers=12", "model.decoder_layers=3"]).model
    assert (m.encoder_layers, m.decoder_layers) == (12, 3)
    m = compose("lm_pre_ln_16l", ["model.decoder_embed_dim=1024", "model.decoder_layers=4"]).model
    assert (m.decoder_layers, m.decoder_embed_dim, m.decoder_input_dim, m.decoder_output_dim) == (4, 1024, 1024, 1024)


@pytest.mark.parametrize("name", ["transformer_b2t_18l", "transformer_admin_6l"])
def test_translation_sizes_written_are_the_architecture_defaults(name):
    """The explicit sizes change nothing: they are what fairseq would have run (the architecture's defaults)."""
    from argparse import Namespace

    from fairseq.models import ARCH_CONFIG_REGISTRY

    import b2t_fairseq  # noqa: F401

    m = OmegaConf.to_container(compose(name).model, resolve=True)
    want = Namespace()
    ARCH_CONFIG_REGISTRY[m["_name"]](want)
    sizes = {k: v for k, v in vars(want).items() if k.endswith(("layers", "embed_dim", "attention_heads"))}
    assert len(sizes) == 8 and all(m[k] == v for k, v in sizes.items()), (m, sizes)


def test_lm_sizes_written_are_the_model_defaults():
    import dataclasses

    from fairseq.models import MODEL_DATACLASS_REGISTRY

    import b2t_fairseq  # noqa: F401

    m = OmegaConf.to_container(compose("lm_deepnorm_16l").model, resolve=True)
    defaults = {f.name: f.default for f in dataclasses.fields(MODEL_DATACLASS_REGISTRY["transformer_lm_b2t"])}
    for key in ("decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_attention_heads", "decoder_input_dim",
                "decoder_output_dim"):
        assert m[key] == defaults[key], key
    assert m["decoder_layers"] == 16


def test_runs_in_the_current_folder_and_keeps_hydra_record_in_save_dir():
    """fairseq's own hydra.run.dir: a relative checkpoint.save_dir is the same folder every run (resume)."""
    cfg = compose("transformer_b2t_6l", ["checkpoint.save_dir=ck/x"])
    assert cfg.hydra.run.dir == "."
    assert cfg.hydra.output_subdir == "ck/x/.hydra"


@pytest.mark.parametrize("argv,fragments", [
    (["optimization.lrr=1"], ["Could not override 'optimization.lrr'", "+optimization.lrr=1"]),
    (["--bogus"], ["unrecognized arguments: --bogus", "--help"]),
    (["dataset.max_tokens=abc"], ["dataset.max_tokens=abc", "could not be converted to Integer"]),
    (["distributed_training.distributed_world_size=3"], ["no dataset.max_tokens fits 3 processes"]),
    (["--config-name", "nothere"], ["no nothere.yaml in", "transformer_b2t_6l"]),
])
def test_hydra_errors_are_one_line(argv, fragments, capsys, tmp_path, monkeypatch):
    from b2t_tools.commands import cli

    monkeypatch.chdir(tmp_path)
    name = [] if "--config-name" in argv else ["--config-name", "transformer_b2t_6l"]
    with pytest.raises(SystemExit) as e:
        cli.hydra_train(["--config-dir", str(REPO / "configs"), *name, *argv, f"task.data={tmp_path}"])
    assert e.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "b2t-hydra-train", *fragments)
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow  # a child process: e2e
def test_plain_fairseq_hydra_train_resolves_the_gpu_count(tmp_path):
    """Hydra imports hydra_plugins/b2t_fairseq_resolvers at start-up: plain fairseq-hydra-train resolves
    ${b2t_update_freq:...} without the plugin's command."""
    from helpers import run

    p = run(["fairseq-hydra-train", "--config-dir", REPO / "configs", "--config-name", "transformer_b2t_6l",
             "distributed_training.distributed_world_size=2", "--cfg", "job", "--resolve"], cwd=tmp_path)
    import yaml

    assert yaml.safe_load(p.stdout)["optimization"]["update_freq"] == [64]


def test_b2t_hydra_train_resolves_the_gpu_count_with_overrides_before_hydra_flags(capsys, tmp_path, monkeypatch):
    """`KEY=VALUE --cfg job` (the plugin's user_dir comes last) reads as Hydra would read it with the flags first."""
    import yaml

    from b2t_tools.commands import cli

    monkeypatch.chdir(tmp_path)
    assert cli.hydra_train(["--config-dir", str(REPO / "configs"), "--config-name", "lm_b2t_6l",
                            "distributed_training.distributed_world_size=4", "--cfg", "job", "--resolve"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["optimization"]["update_freq"] == [8] and cfg["distributed_training"]["distributed_world_size"] == 4
