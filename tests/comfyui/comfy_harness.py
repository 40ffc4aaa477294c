"""Running a real ComfyUI for the pack's tests: the tiny model files ComfyUI can load, a headless server with the
pack on its custom-node path, and the UI → API conversion of workflows. Not a test module.

The model set is the ``comfyui-min`` tiny ACE-Step 1.5 checkpoint in ComfyUI's split layout, as the core's
generator writes it. Its Qwen3 text encoder has the full Qwen3-0.6B-ACE15 shape: ComfyUI builds that encoder with
fixed sizes (vocabulary 151669, 28 layers, 16 heads, MLP 3072) and refuses tensors of other shapes, while layers
missing from a file are left uninitialised (NaN conditioning). Layers 2–27 have zero projections, which makes them
exact identities, so the file is as small as ComfyUI allows (1.19 GB in bf16) and cheap to generate.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import wave
from pathlib import Path
from typing import Any, Optional

MODEL_SET_VERSION = "2"
DIT_NAME = "acestep_v1.5_turbo.safetensors"
TE_NAME = "qwen_0.6b_ace15.safetensors"
LM_NAME = "qwen_1.7b_ace15.safetensors"  # a second file for DualCLIPLoader; see write_model_set
VAE_NAME = "ace_1.5_vae.safetensors"
PACK_DIR = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------------
# model files
# ----------------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    root = os.environ.get("SIDESTEP_TEST_CACHE") or os.path.join(tempfile.gettempdir(), "sidestep-comfy-tests")
    path = Path(root) / f"model-set-v{MODEL_SET_VERSION}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_model_set() -> Path:
    """``<cache>/models/{diffusion_models,text_encoders,vae}``: the ``comfyui-min`` tiny checkpoint in ComfyUI's
    split layout, written once by the core's generator and reused.

    ``qwen_1.7b_ace15.safetensors`` is a link to the 0.6B file: DualCLIPLoader needs two files, ComfyUI routes
    any 1024-wide Qwen to the 0.6B slot, and the workflows never run the 5 Hz LM (generate_audio_codes off).
    """
    from sidestep_core.tiny import make_tiny_checkpoint

    root = cache_root()
    models = root / "models"
    done = root / "complete"
    if done.is_file():
        return models
    shutil.rmtree(models, ignore_errors=True)
    ckpt = make_tiny_checkpoint(root, "comfyui-split", "comfyui-min", 0)
    assert ckpt.dit == models / "diffusion_models" / DIT_NAME and ckpt.vae == models / "vae" / VAE_NAME
    (models / "text_encoders" / LM_NAME).symlink_to(TE_NAME)
    done.write_text(MODEL_SET_VERSION)
    return models


# ----------------------------------------------------------------------------------------------------------
# audio
# ----------------------------------------------------------------------------------------------------------


def write_wav(path: Path, seconds: float, freq: float, rate: int = 48000) -> Path:
    """A stereo 16-bit WAV: two sines a fifth apart with a little vibrato."""
    n = int(seconds * rate)
    frames = bytearray()
    for i in range(n):
        t = i / rate
        left = 0.4 * math.sin(2 * math.pi * freq * t + 0.3 * math.sin(2 * math.pi * 5 * t))
        right = 0.4 * math.sin(2 * math.pi * freq * 1.5 * t)
        frames += struct.pack("<hh", int(left * 32767), int(right * 32767))
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(frames))
    return path


def write_dataset(folder: Path, n: int = 2, seconds: float = 3.0) -> Path:
    for i in range(n):
        write_wav(folder / f"song{i}.wav", seconds, 220.0 * (1 + 0.25 * i))
        (folder / f"song{i}.txt").write_text(
            f"caption: a test tone number {i}\nbpm: 120\nkeyscale: C major\ntimesignature: 4\nlanguage: en\n"
            f"lyrics:\n[verse]\nla la la {i}\n")
    return folder


# ----------------------------------------------------------------------------------------------------------
# the server
# ----------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI headless on loopback, base directory ``base``, the pack linked into ``base/custom_nodes``."""

    def __init__(self, comfyui_dir: Path, base: Path, models: Path, stand_ins: Optional[Path],
                 pack_name: str = "ComfyUI-SideStep", extra_paths: Optional[dict] = None):
        self.comfyui_dir, self.base, self.models = Path(comfyui_dir), Path(base), Path(models)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = str(uuid.uuid4())
        self.log_path = self.base / "comfyui.log"
        self.proc: Optional[subprocess.Popen] = None
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / pack_name
        if not link.exists():
            link.symlink_to(PACK_DIR, target_is_directory=True)
        for sub in ("diffusion_models", "text_encoders", "vae", "loras", "checkpoints"):
            (self.base / "models" / sub).mkdir(parents=True, exist_ok=True)
        config = {"sidestep_tests": {"base_path": str(self.models), "diffusion_models": "diffusion_models",
                                     "text_encoders": "text_encoders", "vae": "vae", **(extra_paths or {})}}
        self.config_path = self.base / "extra_model_paths.yaml"
        self.config_path.write_text(json.dumps(config))  # JSON is valid YAML
        self.env = dict(os.environ)
        self.env.pop("COMFYUI_DIR", None)  # the pack must find ComfyUI's tokenizer through the running ComfyUI
        if stand_ins:
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stand_ins), self.env.get("PYTHONPATH")]))

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--extra-model-paths-config", str(self.config_path),
               "--disable-api-nodes", "--database-url", "sqlite:///:memory:"]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui_dir, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not start in {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # ----- HTTP -----
    def get(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def post(self, path: str, body: Any, timeout: float = 30) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode(errors="replace")

    def queue(self, prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200:
            raise AssertionError(f"POST /prompt failed ({status}): {json.dumps(body, indent=1)[:4000]}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 900.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in (hist or {}):
                return hist[prompt_id]
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log_tail()}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 900.0) -> dict:
        entry = self.wait(self.queue(prompt), timeout)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            raise AssertionError(f"prompt failed: {json.dumps(status.get('messages'), indent=1)[-4000:]}\n"
                                 f"{self.log_tail()}")
        return entry


# ----------------------------------------------------------------------------------------------------------
# UI workflow -> API prompt
# ----------------------------------------------------------------------------------------------------------

FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}


def _spec():
    from pack_loader import pack_module

    return pack_module("spec")


def check_widgets(node: dict, info: dict) -> list[str]:
    """Widget values of a UI-format node against ComfyUI's /object_info entry (the pack's own checker)."""
    return _spec().check_widgets(node, info)


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (positional widgets_values, links) into an API prompt.

    Widget values are matched to inputs in ``input_order`` (required, then optional), skipping the extra
    ``control_after_generate`` value of seed-like widgets and expanding V3 dynamic combos ("name.sub").
    Frontend-only nodes (notes, primitives, reroutes) are dropped; primitives and reroutes are resolved.
    """
    S = _spec()
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {l[0]: l for l in workflow["links"]}

    def source(link_id: int) -> Optional[list]:
        link = links[link_id]
        src = nodes[link[1]]
        if src["type"] == "Reroute":
            inp = src["inputs"][0].get("link")
            return source(inp) if inp is not None else None
        if src["type"] == "PrimitiveNode":
            return None
        return [str(link[1]), link[2]]

    def primitive_value(link_id: int):
        src = nodes[links[link_id][1]]
        return src["widgets_values"][0] if src["type"] == "PrimitiveNode" else None

    prompt: dict = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        info = object_info[node["type"]]
        order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs: dict = {}
        pos = 0
        for name in order:
            spec = specs[name]
            if S.is_widget(spec):
                value = values[pos] if pos < len(values) else spec[1].get("default") if len(spec) > 1 else None
                pos += 1
                if S.has_control(name, spec):
                    pos += 1
                if spec[0] == "COMFY_DYNAMICCOMBO_V3":
                    option = next(o for o in spec[1]["options"] if o["key"] == value)
                    for sub_name in option["inputs"].get("required", {}):
                        inputs[f"{name}.{sub_name}"] = values[pos]
                        pos += 1
                inputs[name] = value
            if name in linked:
                src = source(linked[name])
                inputs[name] = src if src is not None else primitive_value(linked[name])
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title") or info.get("display_name", node["type"])}}
    return prompt


class WebSocketLog:
    """Collects the server's WebSocket messages for this client in a background thread (websocket-client)."""

    def __init__(self, server: ComfyServer):
        import threading

        import websocket  # websocket-client

        self.messages: list[dict] = []
        self._ws = websocket.create_connection(
            f"ws://127.0.0.1:{server.port}/ws?clientId={server.client_id}", timeout=5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import websocket

        while not self._stop.is_set():
            try:
                raw = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:  # closed
                return
            if isinstance(raw, str):
                try:
                    self.messages.append(json.loads(raw))
                except ValueError:
                    pass

    def close(self) -> None:
        self._stop.set()
        try:
            self._ws.close()
        finally:
            self._thread.join(10)

    def of_type(self, kind: str) -> list[dict]:
        return [m.get("data", {}) for m in self.messages if m.get("type") == kind]
