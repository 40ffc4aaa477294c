"""``sidestep demo``: the whole pipeline on the embedded tiny model, on the CPU, in well under a minute.

synthetic audio → preprocess → estimate → train the DiT adapter and the planner LM's LoRA together → export →
apply and generate. Nothing is downloaded; every output is written under ``--workdir`` and its location printed.
"""

from __future__ import annotations

import math
import shutil
import struct
import tempfile
import time
import wave
from pathlib import Path
from typing import Optional

from ._progress import EXIT_CODES_HELP, EXIT_FAILED, EXIT_OK, Renderer, add_plain, is_plain, say

SAMPLE_RATE = 48_000
CLIPS = (  # (file stem, seconds, base frequency in Hz, caption)
    ("tone_a", 1.2, 220.0, "slow sine drone, warm"),
    ("tone_b", 1.0, 330.0, "bright plucked arpeggio"),
    ("tone_c", 0.8, 275.0, "pulsing synth chord"),
)
TRIGGER = "sdemo"


def register(sub, name):
    p = sub.add_parser(
        name,
        help="run the whole pipeline on the embedded tiny model (about half a minute on a CPU)",
        description="Write (once) a deterministic tiny ACE-Step 1.5 model with its 5 Hz planner LM, synthesise a "
        "few audio clips, then preprocess them, estimate gradients, train a small DiT adapter and a LoRA on the "
        "planner LM in one run, export the DiT adapter in ComfyUI's format and apply it to the model — printing "
        "where each output went. Nothing is downloaded.",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the outputs go (default: a new temporary folder, kept and printed)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the tiny model is kept (default: ~/.cache/sidestep)")
    p.add_argument("--adapter", choices=("lora", "dora", "lokr", "loha", "oft"), default="lora",
                   help="adapter type to train (default: %(default)s)")
    p.add_argument("--steps", type=int, default=8,
                   help="training steps, of both adapters at once (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the audio, training and estimation (default: %(default)s)")
    add_plain(p)
    return p


# ----------------------------------------------------------------------------------------------------------


def synth_clip(seconds: float, freq: float, seed: int) -> list[tuple[float, float]]:
    """A stereo clip: a few harmonics with a slow tremolo, a different detune per channel."""
    import torch

    n = int(seconds * SAMPLE_RATE)
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(4, generator=g) * 2 * math.pi
    t = torch.arange(n, dtype=torch.float64) / SAMPLE_RATE
    env = 0.6 + 0.4 * torch.sin(2 * math.pi * 2.0 * t + float(phase[0]))
    left = sum(torch.sin(2 * math.pi * freq * k * t + float(phase[k % 4])) / k for k in (1, 2, 3))
    right = sum(torch.sin(2 * math.pi * freq * 1.003 * k * t + float(phase[(k + 1) % 4])) / k for k in (1, 2, 3))
    return list(zip((0.25 * env * left).tolist(), (0.25 * env * right).tolist()))


def write_wav(path: Path, frames: list[tuple[float, float]]) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        data = bytearray()
        for lft, rgt in frames:
            data += struct.pack("<hh", int(max(-1.0, min(1.0, lft)) * 32767), int(max(-1.0, min(1.0, rgt)) * 32767))
        w.writeframes(bytes(data))


def make_audio(folder: Path, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (stem, seconds, freq, caption) in enumerate(CLIPS):
        path = folder / f"{stem}.wav"
        write_wav(path, synth_clip(seconds, freq, seed + i))
        (folder / f"{stem}.txt").write_text(
            f"caption: {caption}\ntrigger: {TRIGGER}\nbpm: 120\nlyrics:\n[Instrumental]\n", encoding="utf-8")
        paths.append(path)
    return paths


class _Stage:
    def __init__(self, number: int, total: int, title: str):
        self.t0 = time.perf_counter()
        say(f"[{number}/{total}] {title}")

    def done(self, text: str) -> None:
        say(f"      {text}  ({time.perf_counter() - self.t0:.1f} s)")


# ----------------------------------------------------------------------------------------------------------


def run_demo(workdir: Path, *, cache_dir: Optional[Path] = None, adapter: str = "lora", steps: int = 8,
             seed: int = 0, plain: bool = True) -> dict[str, Path]:
    """Run every stage; return where each output went."""
    import torch

    from ..adapters import read_adapter_weights
    from ..adapters.comfy_export import export_comfyui
    from ..planner.lm_adapter import LM_FOLDER, export_lm_comfyui
    from ..config import TrainConfig
    from ..data.preprocess import PreprocessConfig, preprocess
    from ..estimate import EstimateSettings, estimate
    from ..model import load_acestep
    from ..tiny.writer import default_demo_checkpoint
    from ..training import train

    t0 = time.perf_counter()
    workdir = Path(workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    n = 7

    st = _Stage(1, n, "tiny model (written once, then reused)")
    ckpt = default_demo_checkpoint(cache_dir)
    out["model"], out["lm"] = ckpt.dit, ckpt.planner
    st.done(f"model: {ckpt.dit}; planner LM: {ckpt.planner}")

    st = _Stage(2, n, "synthetic audio")
    audio_dir = workdir / "audio"
    clips = make_audio(audio_dir, seed)
    out["audio"] = audio_dir
    st.done(f"{len(clips)} stereo 48 kHz clips with captions: {audio_dir}")

    st = _Stage(3, n, "preprocess (VAE, text encoder, condition encoder → tensor cache)")
    dataset = workdir / "dataset"
    pre = preprocess(ckpt.dit, audio_dir, dataset, config=PreprocessConfig(device="cpu", seed=seed),
                     progress=Renderer(plain, "preprocess", "item"))
    if not pre.ok:
        raise RuntimeError(f"{audio_dir}: preprocessing produced no samples: "
                           + "; ".join(f"{f.path}: {f.reason}" for f in pre.failures))
    out["dataset"] = dataset
    st.done(f"{pre.samples} samples cached: {dataset}")

    st = _Stage(4, n, "estimate gradients (which projections matter for these clips)")
    result = estimate(ckpt.dit, dataset, EstimateSettings(batches=2, runs=2, seed=seed, device="cpu",
                                                          precision="fp32", base_rank=8, rank_min=4, rank_max=16,
                                                          gradient_checkpointing=False),
                      progress=Renderer(plain, "estimate"))
    est_path = result.save(workdir / "estimate.json")
    out["estimate"] = est_path
    top = ", ".join(m for m, _ in result.scores[:3])
    st.done(f"top modules: {top}; {len(result.targets)} suggested: {est_path}")

    st = _Stage(5, n, f"train a {adapter} adapter on the suggested modules and a LoRA on the planner LM "
                      f"together ({steps} steps)")
    settings = result.train_settings
    cfg = TrainConfig(adapter=adapter, rank=8, alpha=8.0, dropout=0.0, precision="fp32", optimizer="adamw",
                      learning_rate=5e-3, warmup_steps=0, scheduler="constant", max_steps=steps, save_every=0,
                      crop_seconds=0, tensorboard=False, estimate_steps=0, device="cpu", seed=seed,
                      gradient_checkpointing=False, oft_block_size=8, histogram_every=0,
                      train_models="both", lm=str(ckpt.planner), lm_rank=4, lm_alpha=8.0, lm_dropout=0.0,
                      lm_learning_rate=5e-3,
                      target_modules=settings["target_modules"],
                      **({} if adapter == "oft" else {"rank_pattern": settings["rank_pattern"],
                                                      "alpha_pattern": settings["alpha_pattern"]}))
    run_dir = workdir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    res = train(cfg, ckpt.dit, dataset, run_dir, progress=Renderer(plain, "train", "step"))
    out["adapter"], out["lm_adapter"] = res.final_dir, res.final_dir / LM_FOLDER
    lm_losses = _lm_losses(run_dir / "loss.csv")
    st.done(f"DiT loss {res.losses[0]:.4f} → {res.losses[-1]:.4f}; adapter: {res.final_dir}\n"
            f"      LM loss {lm_losses[0]:.4f} → {lm_losses[-1]:.4f}; LM adapter (PEFT folder): {out['lm_adapter']}")

    st = _Stage(6, n, "export for ComfyUI (the DiT adapter for LoraLoaderModelOnly; the LM adapter if it fits)")
    aw = read_adapter_weights(res.final_dir)
    loaded = load_acestep(ckpt.dit, dtype=torch.float32, parts={"decoder", "null_condition_emb"})
    exported, notes = export_comfyui(aw, workdir / f"sidestep_demo_{adapter}_comfyui.safetensors",
                                     base=loaded.model, base_identity=loaded.info.identity,
                                     base_variant=loaded.info.variant)
    out["comfyui_file"] = exported
    st.done(f"{exported.stat().st_size / 1024:.0f} KiB: {exported}" + (f" ({'; '.join(notes)})" if notes else ""))
    try:  # ComfyUI runs only the 1.7B and 4B planner LMs: the tiny LM's adapter is refused, and the demo says so
        out["lm_comfyui_file"] = export_lm_comfyui(out["lm_adapter"],
                                                   workdir / "sidestep_demo_lm_lora_comfyui.safetensors")
        say(f"      LM adapter for ComfyUI: {out['lm_comfyui_file']}")
    except ValueError as exc:
        say(f"      LM adapter not exported for ComfyUI ({exc}); it stays a PEFT folder: {out['lm_adapter']}")

    st = _Stage(7, n, "apply the exported file and generate audio with it (strength 0 = base, 1 = adapter)")
    from ..inference.generate import Generator, Prompt, compare, write_flac

    gen = Generator.load(ckpt.dit, device="cpu")
    prompt = Prompt(caption=f"{TRIGGER}, {CLIPS[0][3]}", seconds=2.0, seed=seed, name="demo")
    renders = compare(gen, prompt, exported, strengths=(0.0, 1.0))
    base, adapted = renders[0].waveform, renders[-1].waveform
    change = float((adapted - base).norm() / base.norm().clamp_min(1e-12))
    if change == 0.0:
        raise RuntimeError("applying the adapter did not change the generated audio")
    for r in renders:
        name = f"generated_strength_{r.strength:g}.flac"
        out[f"audio@{r.strength:g}"] = write_flac(workdir / name, r.waveform, r.sample_rate)
    st.done(f"2 s of 48 kHz stereo at strengths 0 and 1; the adapter changes the audio by {100 * change:.1f} %")
    say(f"demo finished in {time.perf_counter() - t0:.1f} s; outputs in {workdir}")
    return out


def _lm_losses(csv_path: Path) -> list[float]:
    """The planner LM's loss per step, from the run's loss log (the run's result holds the DiT's)."""
    import csv

    with open(csv_path, newline="", encoding="utf-8") as fh:
        return [float(r["lm_loss"]) for r in csv.DictReader(fh) if r.get("lm_loss")]


def run(args) -> int:
    import torch

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sidestep-demo-"))
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    out = run_demo(workdir, cache_dir=args.cache_dir, adapter=args.adapter, steps=args.steps, seed=args.seed,
                   plain=is_plain(args))
    say("outputs:")
    for k, v in out.items():
        say(f"  {k:<13} {v}")
    return EXIT_OK if out else EXIT_FAILED
