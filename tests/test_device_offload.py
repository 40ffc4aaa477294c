"""Layer offload (sidestep_core.device.offload): exact on CPU, where the same streaming code runs with real copies."""

from __future__ import annotations

import pytest
import torch

from sidestep_core.device import load_base
from sidestep_core.device.offload import LayerStreamer
from sidestep_core.training.adapters import inject_adapter, read_adapter
from sidestep_core.training.loop import train
from train_helpers import fast_config, make_cache, make_checkpoint, single_thread  # noqa: F401


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    return make_checkpoint(root / "ck"), make_cache(root / "ds")


def _inputs(decoder, frames=24, cond=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = decoder.config
    return dict(hidden_states=torch.randn(1, frames, c.audio_acoustic_hidden_dim, generator=g),
                timestep=torch.tensor([0.7]), timestep_r=torch.tensor([0.7]),
                encoder_hidden_states=torch.randn(1, cond, c.enc_hidden, generator=g),
                context_latents=torch.randn(1, frames, c.in_channels - c.audio_acoustic_hidden_dim, generator=g))


def test_layers_stream_in_and_out_around_their_forward(tiny):
    ck, _ = tiny
    decoder = load_base(ck, dtype=torch.float32).model.decoder
    hosts = {i: {n: t for n, t in layer.named_parameters()} for i, layer in enumerate(decoder.layers)}
    streamer = LayerStreamer(list(decoder.layers[:3]), torch.device("cpu"))
    seen = []

    def probe(i):
        def hook(module, args, output):
            w = module.mlp.up_proj.weight
            seen.append((i, w.data_ptr(), streamer.slots[i][0].host.data_ptr(), sorted(streamer.pending)))
        return hook

    handles = [layer.register_forward_hook(probe(i), prepend=True) for i, layer in enumerate(decoder.layers[:3])]
    with torch.no_grad():
        decoder(**_inputs(decoder))
    for h in handles:
        h.remove()
    # inside its forward a layer runs on a copy, and the next layer is already on its way
    assert [s[0] for s in seen] == [0, 1, 2]
    host_ptrs = {i: decoder.layers[i].mlp.up_proj.weight.data_ptr() for i in range(3)}
    assert all(ptr != host_ptrs[i] for i, ptr, _, _ in seen)
    assert [s[3] for s in seen] == [[1], [2], []]
    # afterwards the modules hold the host tensors again, and untouched layers kept theirs
    assert not streamer.installed and not streamer.pending
    assert decoder.layers[3].mlp.up_proj.weight is hosts[3]["mlp.up_proj.weight"]
    streamer.close()


@pytest.mark.parametrize("selective", [False, True])
@pytest.mark.parametrize("bp", ["bf16", "nf4"])
def test_forward_backward_is_bit_exact_with_offload(tiny, bp, selective):
    """Selective checkpointing too: it replays a layer's ops by their count, and the streaming hooks inside the
    layer copy other layers in its backward re-run than in its forward (that failed in backward)."""
    ck, _ = tiny
    outs = []
    for n in (0, 2, 4):
        decoder = load_base(ck, base_precision=bp, dtype=torch.bfloat16).model.decoder
        torch.manual_seed(0)
        adapter = inject_adapter(decoder, fast_config(adapter="lora", rank=4))
        decoder.checkpoint_ratio, decoder.checkpoint_selective = 1.0, selective
        decoder.recompute_last = n == len(decoder.layers)  # as Holding.attach sets it: streamed layers are re-run
        adapter.module.train()
        streamer = LayerStreamer(list(decoder.layers[:n]), torch.device("cpu")) if n else None
        inp = _inputs(decoder)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = adapter.module(**inp)
        out.float().square().mean().backward()
        if streamer:  # streamed in forward, and again for backward's re-run of each checkpointed layer
            assert streamer.transfers == 2 * n and not streamer.pending
        outs.append((out.detach(), [p.grad.clone() for p in adapter.parameters()]))
    for out, grads in outs[1:]:
        assert torch.equal(out, outs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, outs[0][1]))


@pytest.mark.parametrize("kind", ["lora", "lokr", "oft"])
def test_training_is_identical_with_and_without_offload(tiny, tmp_path, kind):
    ck, ds = tiny
    runs = {}
    for off in ("0", "2", "4"):
        cfg = fast_config(adapter=kind, precision="bf16", max_steps=3, offload_layers=off,
                          gradient_checkpointing=off != "2")  # offload checkpoints its layers itself
        runs[off] = train(cfg, ck, ds, tmp_path / f"{kind}-{off}")
    ref = read_adapter(runs["0"].final_dir).tensors
    for off in ("2", "4"):
        assert runs[off].losses == runs["0"].losses
        got = read_adapter(runs[off].final_dir).tensors
        assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_run_files_record_the_device_settings_used_and_the_ones_asked(tiny, tmp_path):
    """``offload_layers auto`` (as ``memory auto``'s precision and fused backward) is resolved before loading:
    training_config.json and the adapter's metadata hold the value used, ``requested`` the user's."""
    import json

    from safetensors import safe_open

    from sidestep_core.adapters import detect_format
    from sidestep_core.device import Holding

    ck, ds = tiny
    cfg = fast_config(max_steps=1, offload_layers="auto", fused_backward=False)
    assert Holding("nf4", 2, fused_backward=True).chosen(cfg) == {
        "base_precision": "nf4", "offload_layers": "2", "fused_backward": True}
    assert Holding("bf16", 0).chosen(cfg.replace(offload_layers="0")) == {}
    run = train(cfg, ck, ds, tmp_path / "auto")
    conf = json.loads((tmp_path / "auto" / "training_config.json").read_text())
    assert conf["config"]["offload_layers"] == "0" and conf["requested"] == {"offload_layers": "auto"}
    with safe_open(str(detect_format(run.final_dir)[1]), framework="pt") as f:
        assert json.loads(f.metadata()["sidestep_training"])["offload_layers"] == "0"
    train(cfg.replace(offload_layers="0"), ck, ds, tmp_path / "manual")
    assert json.loads((tmp_path / "manual" / "training_config.json").read_text())["requested"] == {}
