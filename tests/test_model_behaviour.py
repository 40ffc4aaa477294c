"""Properties of the model that the parity goldens alone would not pin down."""

import pytest
import torch

from sidestep_core.model import AceStepModel
from sidestep_core.model.encoder import pack_sequences
from sidestep_core.tiny import get_profile
from sidestep_core.tiny.writer import dit_state

CFG = get_profile("tiny").dit


@pytest.fixture(scope="module")
def model():
    m = AceStepModel(CFG)
    m.load_state_dict(dit_state(get_profile("tiny"), 0))
    return m.eval()


def inputs(b=2, t=37, l=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(b, t, 64, generator=g),
        timestep=torch.tensor([0.7, 0.2][:b]),
        timestep_r=torch.tensor([0.7, 0.2][:b]),
        encoder_hidden_states=torch.randn(b, l, CFG.hidden_size, generator=g),
        context_latents=torch.randn(b, t, 128, generator=g),
    )


def test_odd_length_is_padded_and_cropped(model):
    x = inputs(t=37)
    assert model.decoder(**x).shape == (2, 37, 64)


def test_sliding_window_limits_the_receptive_field(model):
    """Changing the last frames must not reach the first frames through sliding layers alone."""
    x = inputs(b=1, t=80)  # 40 patch tokens, window 8
    y = model.decoder(**x)
    x2 = {k: v.clone() for k, v in x.items()}
    x2["hidden_states"][:, -2:] += 1.0
    y2 = model.decoder(**x2)
    assert not torch.allclose(y[:, :2], y2[:, :2])  # full layers connect everything
    full = AceStepModel(CFG.__class__(**{**CFG.__dict__, "use_sliding_window": False}))
    full.load_state_dict(model.state_dict())
    assert not torch.allclose(full.eval().decoder(**x), y, atol=1e-5)  # the band changes the result


def test_no_padding_mask_in_the_dit(model):
    """Extra (padding) condition tokens change the output: the pretrained DiT attends to them."""
    x = inputs(b=1)
    y = model.decoder(**x)
    x["encoder_hidden_states"] = torch.cat([x["encoder_hidden_states"], torch.zeros(1, 3, CFG.hidden_size)], 1)
    assert not torch.allclose(model.decoder(**x), y, atol=1e-6)


def test_time_embed_r_is_live(model):
    x = inputs(b=1)
    y = model.decoder(**x)
    x["timestep_r"] = x["timestep_r"] - 0.3
    assert not torch.allclose(model.decoder(**x), y)


def test_lyric_padding_does_not_change_valid_positions(model):
    g = torch.Generator().manual_seed(1)
    lyr = torch.randn(1, 9, CFG.text_hidden_dim, generator=g)
    padded = torch.cat([lyr, torch.randn(1, 6, CFG.text_hidden_dim, generator=g)], 1)
    mask = torch.tensor([[1] * 9 + [0] * 6])
    a = model.encoder.lyric_encoder(lyr, torch.ones(1, 9))
    b = model.encoder.lyric_encoder(padded, mask)
    torch.testing.assert_close(a, b[:, :9], atol=1e-5, rtol=1e-5)


def test_pack_sequences_moves_valid_tokens_first_in_order():
    a = torch.arange(4.0).reshape(1, 4, 1)
    b = torch.arange(10.0, 13.0).reshape(1, 3, 1)
    packed, mask = pack_sequences(a, b, torch.tensor([[1, 1, 0, 0]]), torch.tensor([[1, 0, 1]]))
    assert packed[0, :4, 0].tolist() == [0.0, 1.0, 10.0, 12.0]
    assert mask.tolist() == [[True] * 4 + [False] * 3]


def test_timbre_slots_follow_the_order_mask(model):
    refs = torch.randn(3, 10, 64)
    out, mask = model.encoder.timbre_encoder(refs, torch.tensor([1, 0, 1]))
    assert out.shape == (2, 2, CFG.hidden_size)
    assert mask.tolist() == [[1, 0], [1, 1]]
    single = model.encoder.timbre_encoder(refs[1:2], torch.tensor([0]))[0]
    torch.testing.assert_close(out[0, 0], single[0, 0])


def test_checkpointing_gives_the_same_gradients(model):
    x = inputs()
    grads = []
    for ratio in (0.0, 1.0):
        m = AceStepModel(CFG)
        m.load_state_dict(model.state_dict())
        m.decoder.train()
        m.decoder.checkpoint_ratio = ratio
        m.decoder.requires_grad_(False)
        w = m.decoder.layers[0].self_attn.q_proj.weight
        w.requires_grad_(True)
        m.decoder(**x).square().mean().backward()
        grads.append(w.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("recompute_last", [False, True])
def test_full_checkpointing_runs_the_last_layer_once(model, recompute_last):
    m = AceStepModel(CFG)
    m.load_state_dict(model.state_dict())
    m.decoder.train()
    m.decoder.checkpoint_ratio, m.decoder.recompute_last = 1.0, recompute_last
    calls = [0] * len(m.decoder.layers)
    for i, layer in enumerate(m.decoder.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    m.decoder(**inputs()).square().mean().backward()
    # every layer but the last is recomputed in backward; the last only when asked (offload of every layer)
    assert calls == [2] * (len(calls) - 1) + [2 if recompute_last else 1]


def test_tokenizer_roundtrip_shapes(model):
    silence = torch.zeros(1, 100, 64)
    q, idx = model.tokenize(torch.randn(2, 23, 64), silence)  # padded 23 -> 25 frames
    assert q.shape == (2, 5, CFG.hidden_size) and idx.shape == (2, 5, 1)
    assert int(idx.max()) < 8 * 8 * 8 * 5 * 5 * 5
    torch.testing.assert_close(model.tokenizer.quantizer.from_indices(idx), q)
    assert model.detokenize(q).shape == (2, 25, 64)


def test_text2music_context():
    silence = torch.randn(1, 50, 64)
    ctx = AceStepModel.text2music_context(silence, 30, batch=2)
    assert ctx.shape == (2, 30, 128)
    assert torch.equal(ctx[1, :, :64], silence[0, :30]) and bool((ctx[..., 64:] == 1).all())
