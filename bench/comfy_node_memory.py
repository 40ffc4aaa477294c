"""Host memory of a real ComfyUI server (CPU) while each Side-Step node runs, beside ComfyUI's own model loads.

    COMFYUI_DIR=/path/to/ComfyUI python bench/comfy_node_memory.py [--json out.json]

Starts ComfyUI headless (``main.py --cpu``) with the pack and the ``comfyui-min`` tiny model set of the tests
(tests/comfyui/comfy_harness.py: a small DiT, but the full-size VAE and the full-shape 0.6B text encoder, which
ComfyUI builds with fixed sizes) and queues one prompt per stage, in this order:

  preprocess        Load Checkpoint → Preprocess Audio Folder (2 files of 3 s)
  train             → Train Adapter (2 steps, LoRA r64)
  estimate          → Estimate Gradients (2 batches)
  export            → Export Adapter
  apply             UNETLoader → Apply Adapter (the trained adapter)
  generate          ComfyUI's own text-to-music graph on the applied model (4 s, 2 steps): ComfyUI's loads
  preprocess again  a second folder, after ComfyUI's models were loaded: does unloading them free host memory?

For each stage it reports the server's resident set before the prompt, its peak during the prompt (the kernel's
VmHWM, reset through /proc/<pid>/clear_refs before each prompt, and a 10 ms sampler as a cross-check) and after
the prompt (2 s later). Earlier stages' outputs stay in ComfyUI's cache, as in a user's session.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "comfyui")]

import comfy_harness as H  # noqa: E402  (the tests' server harness and tiny model set)

GIB = 2**30


# ----------------------------------------------------------------------------------------------------------
# the server's memory
# ----------------------------------------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


def rss_anon(pid: int) -> int:
    """Anonymous resident memory: what the process itself allocated. The rest of RSS is file pages (safetensors
    files are read through mmap), which the kernel can drop under pressure."""
    return _status_kib(pid, "RssAnon")


class PeakRss:
    """Peak resident set of ``pid`` over a ``with`` block: the kernel's high-water mark (reset on entry where
    /proc/<pid>/clear_refs allows it) and a 10 ms sampler, which also follows the anonymous part."""

    def __init__(self, pid: int):
        self.pid, self.sampled, self.anon, self.kernel = pid, 0, 0, None
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.sampled = max(self.sampled, rss(self.pid))
                self.anon = max(self.anon, rss_anon(self.pid))
            except (OSError, KeyError):
                return

    def __enter__(self) -> "PeakRss":
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS
            self._reset = True
        except OSError:
            self._reset = False
        self.sampled, self.anon = rss(self.pid), rss_anon(self.pid)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        self._thread.join()
        if self._reset:
            self.kernel = _status_kib(self.pid, "VmHWM")
        return False

    @property
    def peak(self) -> int:
        return max(self.sampled, self.kernel or 0)


# ----------------------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------------------


def filled(info: dict, class_type: str, **given) -> dict:
    """An API-format node with every required widget at its default (first option for combos)."""
    spec = info[class_type]["input"]
    inputs: dict = {}
    for name, s in spec.get("required", {}).items():
        if name in given:
            continue
        kind, opts = s[0], (s[1] if len(s) > 1 else {})
        if isinstance(kind, list):
            inputs[name] = opts.get("default", kind[0] if kind else None)
        elif kind == "COMBO":
            inputs[name] = opts.get("default", (opts.get("options") or [None])[0])
        elif kind == "COMFY_DYNAMICCOMBO_V3":
            key = opts.get("default", opts["options"][0]["key"])
            inputs[name] = key
            option = next(o for o in opts["options"] if o["key"] == key)
            for sub, sub_spec in option["inputs"].get("required", {}).items():
                sub_opts = sub_spec[1] if len(sub_spec) > 1 else {}
                inputs[f"{name}.{sub}"] = sub_opts.get("default", (sub_opts.get("options") or [None])[0])
        elif "default" in opts:
            inputs[name] = opts["default"]
    inputs.update(given)
    return {"class_type": class_type, "inputs": inputs}


def stages(info: dict) -> list[tuple[str, dict]]:
    load = filled(info, "SideStepLoadCheckpoint", model=f"diffusion_models/{H.DIT_NAME}")
    pre = filled(info, "SideStepPreprocessAudio", model=["load", 0], folder="sidestep_dataset")
    train = filled(info, "SideStepTrainAdapter", model=["load", 0], dataset=["pre", 0], max_steps=2,
                   estimate_steps=0, tensorboard=False, output_name="bench", resume=False)
    est = filled(info, "SideStepEstimateGradients", model=["load", 0], dataset=["pre", 0], batches=2, runs=1)
    export = filled(info, "SideStepExportAdapter", adapter=["train", 0], name="bench_memory")
    unet = filled(info, "UNETLoader", unet_name=H.DIT_NAME)
    apply = filled(info, "SideStepApplyAdapter", model=["unet", 0], adapter=["train", 0])
    gen = {
        "clip": filled(info, "DualCLIPLoader", clip_name1=H.TE_NAME, clip_name2=H.LM_NAME, type="ace"),
        "vae": filled(info, "VAELoader", vae_name=H.VAE_NAME),
        "shift": filled(info, "ModelSamplingAuraFlow", model=["apply", 0], shift=3.0),
        "pos": filled(info, "TextEncodeAceStepAudio1.5", clip=["clip", 0], tags="bench", lyrics="",
                      duration=4.0, generate_audio_codes=False),
        "neg": filled(info, "ConditioningZeroOut", conditioning=["pos", 0]),
        "latent": filled(info, "EmptyAceStep1.5LatentAudio", seconds=4.0, batch_size=1),
        "sample": filled(info, "KSampler", model=["shift", 0], positive=["pos", 0], negative=["neg", 0],
                         latent_image=["latent", 0], seed=1, steps=2, cfg=1.0, sampler_name="euler",
                         scheduler="simple", denoise=1.0),
        "decode": filled(info, "VAEDecodeAudio", samples=["sample", 0], vae=["vae", 0]),
        "save": filled(info, "SaveAudio", audio=["decode", 0], filename_prefix="audio/bench_memory"),
    }
    pre2 = dict(pre, inputs={**pre["inputs"], "folder": "sidestep_dataset2"})

    def show(src: list) -> dict:
        return {"class_type": "PreviewAny", "inputs": {"source": src}}

    return [
        ("preprocess", {"load": load, "pre": pre, "show": show(["pre", 0])}),
        ("train", {"load": load, "pre": pre, "train": train, "show": show(["train", 0])}),
        ("estimate", {"load": load, "pre": pre, "est": est, "show": show(["est", 1])}),
        ("export", {"load": load, "pre": pre, "train": train, "export": export}),
        ("apply", {"load": load, "pre": pre, "train": train, "unet": unet, "apply": apply,
                   "show": show(["apply", 0])}),
        ("generate", {"load": load, "pre": pre, "train": train, "unet": unet, "apply": apply, **gen}),
        ("preprocess again", {"load": load, "pre2": pre2, "show": show(["pre2", 0])}),
    ]


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def run(server: H.ComfyServer, prompt: dict, timeout: float = 3600.0) -> None:
    """Queue and wait, patient with a server too busy to answer at once (a loaded shared machine)."""
    import urllib.error

    prompt_id = server.queue(prompt)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            entry = (server.get(f"/history/{prompt_id}", timeout=300) or {}).get(prompt_id)
        except (TimeoutError, urllib.error.URLError):
            entry = None
        if entry is not None:
            status = entry.get("status", {})
            if status.get("status_str") != "success":
                raise RuntimeError(f"prompt failed: {json.dumps(status.get('messages'))[-3000:]}")
            return
        if server.proc.poll() is not None:
            raise RuntimeError(f"ComfyUI died:\n{server.log_tail()}")
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s")


def settle(pid: int, seconds: float = 2.0) -> int:
    time.sleep(seconds)
    return rss(pid)


def measure(comfyui_dir: Path, base: Path) -> list[dict]:
    models = H.write_model_set()
    H.write_dataset(base / "input" / "sidestep_dataset")
    H.write_dataset(base / "input" / "sidestep_dataset2")
    # the tests' torchvision/torchaudio import stand-ins (ComfyUI imports both at start-up)
    folder = base / "standins"
    folder.mkdir()
    stand_ins = folder if H.write_standins(folder) else None
    server = H.ComfyServer(comfyui_dir, base, models, stand_ins).start(timeout=1200)
    rows = []
    try:
        pid = server.proc.pid
        info = server.get("/object_info")
        start = settle(pid)
        rows.append({"stage": "server started", "before": start, "peak": start, "after": start,
                     "anon_before": rss_anon(pid), "seconds": 0.0})
        for name, prompt in stages(info):
            before = settle(pid, 1.0)
            anon_before = rss_anon(pid)
            t0 = time.perf_counter()
            with PeakRss(pid) as peak:
                run(server, prompt)
            seconds = time.perf_counter() - t0
            after = settle(pid)
            rows.append({"stage": name, "before": before, "peak": peak.peak, "after": after,
                         "anon_before": anon_before, "anon_peak": peak.anon, "anon_after": rss_anon(pid),
                         "peak_kernel": peak.kernel, "peak_sampled": peak.sampled, "seconds": seconds})
            print(f"{name:17s} before {before / GIB:5.2f}  peak {peak.peak / GIB:5.2f}  after {after / GIB:5.2f} "
                  f"GiB (anonymous: peak {peak.anon / GIB:5.2f})  ({seconds:.0f} s)", flush=True)
    finally:
        server.stop()
    return rows


def table(rows: list[dict]) -> str:
    out = ["| stage | RSS before GiB | peak GiB | peak − before | anonymous peak − before | after GiB | "
           "after − before | s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        out.append(f"| {r['stage']} | {r['before'] / GIB:.2f} | {r['peak'] / GIB:.2f} | "
                   f"{(r['peak'] - r['before']) / GIB:+.2f} | {(r['anon_peak'] - r['anon_before']) / GIB:+.2f} | "
                   f"{r['after'] / GIB:.2f} | {(r['after'] - r['before']) / GIB:+.2f} | {r['seconds']:.0f} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------
# the real sizes, from parameter counts
# ----------------------------------------------------------------------------------------------------------

XL = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=32, num_attention_heads=32,
          num_key_value_heads=8, encoder_hidden_size=2048, encoder_intermediate_size=6144,
          encoder_num_attention_heads=16, encoder_num_key_value_heads=8)  # docs: ACE-Step 1.5 XL config


def weights_table() -> str:
    """The weights each node loads, in GiB, from parameter counts of the models built on the meta device (no
    download): the tiny test model, the 2B and the XL. The VAE and the 0.6B text encoder are the same for all."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    from sidestep_core.model import AceStepConfig
    from sidestep_core.model.model import AceStepModel
    from sidestep_core.tiny.profiles import get_profile
    from sidestep_core.vae import build_vae

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        te = count(Qwen3Model(Qwen3Config(vocab_size=151669, hidden_size=1024, intermediate_size=3072,
                                          num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                          head_dim=128)))
    vae = count(build_vae({"encoder_hidden_size": 128, "downsampling_ratios": [2, 4, 4, 6, 10],
                           "channel_multiples": [1, 2, 4, 8, 16], "decoder_channels": 128,
                           "decoder_input_channels": 64, "audio_channels": 2, "sampling_rate": 48000},
                          device="meta"))
    configs = {"comfyui-min (tests)": get_profile("comfyui-min").dit, "2B": AceStepConfig(), "XL": AceStepConfig(**XL)}
    out = ["| model | decoder M params | encoder M params | Preprocess pass 1 (VAE + TE, fp32 on CPU) | "
           "Preprocess pass 2 (encoder, bf16) | Train (decoder bf16) | Estimate (decoder fp32 on CPU) | "
           "Export / Apply of a PEFT DoRA (decoder bf16) |", "|---|---|---|---|---|---|---|---|"]
    for name, config in configs.items():
        with torch.device("meta"):
            model = AceStepModel(config)
        dec, enc = count(model.decoder), count(model.encoder)
        out.append(f"| {name} | {dec / 1e6:.0f} | {enc / 1e6:.0f} | {(vae + te) * 4 / GIB:.2f} | "
                   f"{enc * 2 / GIB:.2f} | {dec * 2 / GIB:.2f} | {dec * 4 / GIB:.2f} | {dec * 2 / GIB:.2f} |")
    return (f"VAE {vae / 1e6:.1f} M, text encoder {te / 1e6:.1f} M parameters (GiB of weights below; "
            "activations, optimizer state and ComfyUI itself come on top)\n\n" + "\n".join(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR", ""), help="ComfyUI checkout (COMFYUI_DIR)")
    ap.add_argument("--json", help="write the measurements here as JSON")
    ap.add_argument("--weights-only", action="store_true", help="only the weights table (no server)")
    args = ap.parse_args()
    if args.weights_only:
        print(weights_table())
        return 0
    if not args.comfyui:
        ap.error("set COMFYUI_DIR or pass --comfyui")
    with tempfile.TemporaryDirectory(prefix="sidestep-bench-mem-") as tmp:
        rows = measure(Path(args.comfyui).expanduser().resolve(), Path(tmp))
    import torch

    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, Python {platform.python_version()}, {datetime.now(timezone.utc):%Y-%m-%d}. "
          f"Server started at {rows[0]['before'] / GIB:.2f} GiB.\n")
    print(table(rows))
    print("\n" + weights_table())
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
