"""patches/encoder_fast_path.py: a loaded encoder never takes upstream fairseq 0.12.2's fused fast path,
which bypasses our layers' forward (B2T/Admin crash, DeepNorm runs as Post-LN, padded Post-LN crashes).

Where the installed fairseq has that path (0.12.2), the real one is exercised; elsewhere its shape (a
state-dict loader that sets ``load_to_BT``, the flag both forwards require) is simulated."""

import pytest
import torch
from fairseq.modules import transformer_layer
from helpers import build, toy_batch, transformer_config

from b2t_fairseq.layer_types import KEYS
from b2t_fairseq.patches import encoder_fast_path

BASE = transformer_layer.TransformerEncoderLayerBase
REAL_0_12_2 = encoder_fast_path.has_fast_path(BASE)


@pytest.fixture
def fast_path_fairseq(monkeypatch):
    """This fairseq's encoder layer with 0.12.2's fast-path switch: the real one, or its simulated shape."""
    if not REAL_0_12_2:
        loads = BASE._load_from_state_dict

        def _load_from_state_dict(self, *args, **kwargs):  # 0.12.2: any load arms the fast path
            self.load_to_BT = True
            return loads(self, *args, **kwargs)

        monkeypatch.setattr(BASE, "_load_from_state_dict", _load_from_state_dict)
        assert encoder_fast_path.has_fast_path(BASE)
        encoder_fast_path.install()  # what importing the plugin does on 0.12.2

    def fused(*args, **kwargs):
        raise AssertionError("torch._transformer_encoder_layer_fwd: the encoder bypassed the layers' forward")

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", fused)


@pytest.mark.parametrize("ln", KEYS)
def test_loaded_encoder_runs_its_own_layers(ln, toy_dicts, fast_path_fairseq):
    model, task, _ = build(toy_dicts, "transformer_b2t_tiny", "--ln-position", ln)
    src, lengths, _ = toy_batch(task)  # left padding in row 0
    model.eval()
    with torch.no_grad():
        want = model.encoder(src, src_lengths=lengths)["encoder_out"][0]
    loaded, _, _ = build(toy_dicts, "transformer_b2t_tiny", "--ln-position", ln, seed=2)
    loaded.load_state_dict(model.state_dict())  # what checkpoint loading does (fairseq-generate, hub)
    loaded.eval()
    assert not any(getattr(layer, "load_to_BT", False) for layer in loaded.encoder.layers), ln
    with torch.no_grad():
        got = loaded.encoder(src, src_lengths=lengths)["encoder_out"][0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_only_a_fairseq_with_the_fast_path_is_patched():
    """fairseq-fixed has no fast path: its loader is left as it is (nothing to repair)."""
    if REAL_0_12_2:
        assert BASE._load_from_state_dict.b2t_no_fast_path
    else:
        assert not getattr(BASE.__dict__.get("_load_from_state_dict"), "b2t_no_fast_path", False)
        assert not hasattr(BASE(_tiny_cfg()), "load_to_BT")


def _tiny_cfg():
    cfg = transformer_config()
    cfg.encoder.embed_dim, cfg.encoder.ffn_embed_dim, cfg.encoder.attention_heads = 8, 16, 2
    return cfg
