"""Audio codes: the checkpoint's own FSQ tokenizer at 5 Hz, cached by content, bound to that tokenizer."""

import pytest
import torch
from safetensors.torch import load_file

from sidestep_core.model import load_acestep
from sidestep_core.planner.codes import (
    CodeCache,
    CodesMismatchError,
    audio_tokenizer_identity,
    check_codebook,
    codebook_size,
    codes_from_latents,
    read_codes,
)
from sidestep_core.planner.loading import load_planner
from goldens import DATA


@pytest.fixture(scope="module")
def loaded(tiny_with_lm):
    return load_acestep(tiny_with_lm.root)


def test_codes_match_upstream_tokenizer_and_pad_with_silence(loaded):
    g = load_file(str(DATA / "upstream_golden_tiny.safetensors"))
    x = g["tok.in.x"]  # [2, 20, 64]: upstream's FSQ indices on these latents
    for b in range(2):
        assert torch.equal(codes_from_latents(loaded.model, x[b], loaded.silence_latent),
                           g["tok.out.indices"][b, :, 0].long())
    # 23 frames: padded with the first 2 silence frames to 25, as upstream's tokenize does
    lat = x[0, :18].clone()
    lat = torch.cat([lat, x[1, :5]])
    padded = torch.cat([lat, loaded.silence_latent[0, :2].to(lat)])
    codes = codes_from_latents(loaded.model, lat, loaded.silence_latent)
    assert codes.shape == (5,) and codes.dtype == torch.int64
    assert torch.equal(codes, codes_from_latents(loaded.model, padded, loaded.silence_latent))
    assert int(codes.max()) < codebook_size(loaded.model) == 64000


def test_cache_by_content_and_tokenizer_identity(tmp_path, loaded, tiny_with_lm):
    lat = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    cache = CodeCache(tmp_path / "codes", loaded.model, loaded.silence_latent)
    first = cache.codes(lat)
    files = list((tmp_path / "codes").iterdir())
    assert len(files) == 1 and files[0] == cache.path_for(lat)
    mtime = files[0].stat().st_mtime_ns
    assert torch.equal(cache.codes(lat.clone()), first) and files[0].stat().st_mtime_ns == mtime  # reused
    cache.codes(lat + 0.5)
    assert len(list((tmp_path / "codes").iterdir())) == 2  # other content, other file
    # a model whose audio tokenizer differs: other identity, other key, and the old file is refused by identity
    other = load_acestep(tiny_with_lm.root)
    with torch.no_grad():
        other.model.tokenizer.audio_acoustic_proj.weight.mul_(1.5)
    ident = audio_tokenizer_identity(other.model)
    assert ident != cache.identity
    assert CodeCache(tmp_path / "codes", other.model, other.silence_latent).path_for(lat) != files[0]
    with pytest.raises(CodesMismatchError, match="different audio tokenizer"):
        read_codes(files[0], ident)
    assert torch.equal(read_codes(files[0], cache.identity), first)
    # the codes become LM ids and back
    planner = load_planner(tiny_with_lm.planner)
    check_codebook(loaded.model, planner)
    ids = planner.tokenizer.code_ids(first)
    assert all(151669 <= i < 215669 for i in ids)
    assert planner.tokenizer.codes_from_ids(ids) == first.tolist()


def test_dataset_codes_of_a_preprocessed_folder(tmp_path, loaded):
    from train_helpers import make_cache

    from sidestep_core.data.cache import load_dataset
    from sidestep_core.planner.codes import CODES_DIR, dataset_codes
    from sidestep_core.training.data import open_dataset

    folder = make_cache(tmp_path / "cache", frames=(40, 57))
    codes = dataset_codes(open_dataset(folder), loaded.model, loaded.silence_latent)
    assert set(codes) == {"clip00", "clip01"}
    assert codes["clip00"].shape == (8,) and codes["clip01"].shape == (12,)  # ceil(T / 5)
    lat = {s.id: s.load()["target_latents"] for s in load_dataset(folder)}
    assert torch.equal(codes["clip01"], codes_from_latents(loaded.model, lat["clip01"], loaded.silence_latent))
    files = sorted((folder / CODES_DIR).iterdir())
    assert len(files) == 2
    again = dataset_codes(open_dataset(folder), loaded.model, loaded.silence_latent)
    assert all(torch.equal(again[k], codes[k]) for k in codes)
    assert sorted((folder / CODES_DIR).iterdir()) == files and len(load_dataset(folder)) == 2
