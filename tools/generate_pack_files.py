"""Writes the pack's generated files from ``nodes/spec.py``: ``example_workflows/*.json`` (ComfyUI UI-format
workflows, the format its template browser lists) and ``locales/en/main.json`` (node and input descriptions).

Run from the repository root after changing a node or a TrainConfig field: ``python tools/generate_pack_files.py``
(the tests fail while the committed files differ from what this writes). The pack's node widgets come from
``nodes/spec.py``; ComfyUI's native ACE-Step 1.5 nodes are described below as ComfyUI 0.27 defines them (the
ComfyUI tests check these against a running ComfyUI's /object_info).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import uuid
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load_spec():
    """``nodes/spec.py`` by path, under a private name: ComfyUI has a top-level ``nodes`` module of its own, which
    may already be imported (e.g. in a test session that started ComfyUI)."""
    name = "sidestep_pack_spec"
    if name not in sys.modules:
        loc = importlib.util.spec_from_file_location(name, ROOT / "nodes" / "spec.py")
        module = importlib.util.module_from_spec(loc)
        sys.modules[name] = module  # before running it: dataclasses look their module up there
        loc.loader.exec_module(module)
    return sys.modules[name]


S = _load_spec()

OUT = ROOT / "example_workflows"
TRIGGER = "sdstp"
DIT = "acestep_v1.5_turbo.safetensors"
MODEL_CHOICE = f"diffusion_models/{DIT}"

# Native nodes: (widget names in order, with "+control" after seed-like widgets), socket inputs, outputs.
NATIVE: dict[str, dict[str, Any]] = {
    "UNETLoader": {"widgets": ["unet_name", "weight_dtype"], "inputs": [], "outputs": [("MODEL", "MODEL")]},
    "DualCLIPLoader": {"widgets": ["clip_name1", "clip_name2", "type", "device"], "inputs": [],
                       "outputs": [("CLIP", "CLIP")]},
    "VAELoader": {"widgets": ["vae_name"], "inputs": [], "outputs": [("VAE", "VAE")]},
    "ModelSamplingAuraFlow": {"widgets": ["shift"], "inputs": [("model", "MODEL")], "outputs": [("MODEL", "MODEL")]},
    "TextEncodeAceStepAudio1.5": {
        "widgets": ["tags", "lyrics", "seed", "+control", "bpm", "duration", "timesignature", "language", "keyscale",
                    "generate_audio_codes", "cfg_scale", "temperature", "top_p", "top_k", "min_p"],
        "inputs": [("clip", "CLIP")], "outputs": [("CONDITIONING", "CONDITIONING")]},
    "ConditioningZeroOut": {"widgets": [], "inputs": [("conditioning", "CONDITIONING")],
                            "outputs": [("CONDITIONING", "CONDITIONING")]},
    "EmptyAceStep1.5LatentAudio": {"widgets": ["seconds", "batch_size"], "inputs": [],
                                   "outputs": [("LATENT", "LATENT")]},
    "KSampler": {"widgets": ["seed", "+control", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
                 "inputs": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                            ("latent_image", "LATENT")], "outputs": [("LATENT", "LATENT")]},
    "VAEDecodeAudio": {"widgets": [], "inputs": [("samples", "LATENT"), ("vae", "VAE")],
                       "outputs": [("AUDIO", "AUDIO")]},
    "SaveAudioAdvanced": {"widgets": ["filename_prefix", "format"], "inputs": [("audio", "AUDIO")],
                          "outputs": [("AUDIO", "AUDIO")]},
    "PreviewImage": {"widgets": [], "inputs": [("images", "IMAGE")], "outputs": []},
    "PreviewAny": {"widgets": [], "inputs": [("source", "*")], "outputs": [("STRING", "STRING")]},
    "MarkdownNote": {"widgets": ["text"], "inputs": [], "outputs": []},
}

LYRICS = "[verse]\nwalking through the evening light\nevery color burning bright\n\n[chorus]\nsing it loud, sing it clear\nsidestep, we are here\n"


class Builder:
    def __init__(self) -> None:
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.intended: dict[int, dict[str, Any]] = {}  # node id -> {widget name: value} (before flattening)

    def add(self, kind: str, pos: tuple[int, int], values: Optional[dict] = None, *, title: str = "",
            size: tuple[int, int] = (320, 160)) -> dict:
        values = dict(values or {})
        node_spec = S.BY_ID.get(kind)
        if node_spec is not None:
            # One value per entry the front end reads back, the seed controls included (see spec.has_control).
            defaults = {w.name: w.default for w in node_spec.widgets}
            slots = node_spec.widget_slots
            widgets = []
            for slot in slots:
                name, _, control = slot.partition(".")
                if control:
                    widgets.append(values.pop(slot, node_spec.input(name).control_after_generate or S.FIXED))
                else:
                    widgets.append(values.pop(slot) if slot in values else defaults[slot])
            inputs = [{"name": i.name, "type": i.kind, "link": None} for i in node_spec.inputs if not i.is_widget]
            outputs = [{"name": o.name, "type": o.kind, "links": []} for o in node_spec.outputs]
        else:
            native = NATIVE[kind]
            slots, widgets = [], []
            for name in native["widgets"]:
                slots.append(f"{slots[-1]}.{S.CONTROL}" if name == "+control" else name)
                widgets.append(S.FIXED if name == "+control" else values.pop(name))
            inputs = [{"name": n, "type": t, "link": None} for n, t in native["inputs"]]
            outputs = [{"name": n, "type": t, "links": []} for n, t in native["outputs"]]
        if values:
            raise KeyError(f"{kind}: unknown widget values {sorted(values)}")
        for i, o in enumerate(outputs):
            o["slot_index"] = i
        node = {"id": len(self.nodes) + 1, "type": kind, "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": kind}, "widgets_values": widgets}
        if node_spec is not None:
            node["properties"]["cnr_id"] = "sidestep-nodes"
        if title:
            node["title"] = title
        self.nodes.append(node)
        self.intended[node["id"]] = dict(zip(slots, widgets))
        return node

    def link(self, src: dict, output: str, dst: dict, input_name: str) -> None:
        s_slot = next(i for i, o in enumerate(src["outputs"]) if o["name"] == output)
        d_slot = next(i for i, o in enumerate(dst["inputs"]) if o["name"] == input_name)
        kind = src["outputs"][s_slot]["type"]
        link_id = len(self.links) + 1
        self.links.append([link_id, src["id"], s_slot, dst["id"], d_slot, kind])
        src["outputs"][s_slot]["links"].append(link_id)
        dst["inputs"][d_slot]["link"] = link_id

    def workflow(self, groups: list[dict]) -> dict:
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "sidestep:" + json.dumps(self.nodes, sort_keys=True))),
            "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": groups, "config": {},
            "extra": {"ds": {"scale": 0.7, "offset": [0, 0]}}, "version": 0.4,
        }


# Layout. LiteGraph draws a node's title bar above its ``pos``; each node is stored with the size it is drawn at.
TITLE_H = 30
GAP = 40
RESULT_ROOM = 120  # below a Side-Step node: its result text after a run
TRAIN_ROOM = 320  # below Train Adapter: its loss chart, play button and result text
COMPARE_ROOM = 340  # below Compare Adapters: its grid of play buttons and the table
ROOM = {"SideStepTrainAdapter": TRAIN_ROOM, "SideStepCompareAdapters": COMPARE_ROOM}
# Drawn height (title bar included) of each node as opened in ComfyUI's front end 1.45, the larger of the classic
# and Nodes 2.0 canvases. Nodes are stacked in columns by these heights; the browser tests check that no node
# overlaps another on either canvas. Train Adapter's height follows the adapter type and the Advanced toggle, so it
# always ends its column.
HEIGHTS = {
    "MarkdownNote": 330, "SideStepLoadCheckpoint": 234, "SideStepPreprocessAudio": 310,
    "SideStepTrainAdapter": 780, "SideStepExportAdapter": 202, "SideStepApplyAdapter": 222,
    "SideStepEstimateGradients": 376, "PreviewImage": 290, "PreviewAny": 330, "UNETLoader": 190,
    "DualCLIPLoader": 202, "VAELoader": 190, "ModelSamplingAuraFlow": 190, "TextEncodeAceStepAudio1.5": 550,
    "ConditioningZeroOut": 190, "EmptyAceStep1.5LatentAudio": 190, "KSampler": 342, "VAEDecodeAudio": 190,
    "SaveAudioAdvanced": 174, "SideStepCompareAdapters": 430,
}
WIDTHS = {"MarkdownNote": 420, "SideStepPreprocessAudio": 340, "SideStepTrainAdapter": 360,
          "SideStepCompareAdapters": 360, "SideStepApplyAdapter": 340, "SideStepEstimateGradients": 340,
          "PreviewImage": 420, "PreviewAny": 340, "TextEncodeAceStepAudio1.5": 400}
COLUMN = 400  # distance between columns of 320-360 wide nodes


class Column:
    """Nodes stacked top to bottom at one x, each below the previous one's drawn box."""

    def __init__(self, b: Builder, x: int, y: int = 0) -> None:
        self.b, self.x, self.y = b, x, y

    def add(self, kind: str, values: Optional[dict] = None, *, title: str = "") -> dict:
        height = HEIGHTS[kind]
        node = self.b.add(kind, (self.x, self.y), values, title=title,
                          size=(WIDTHS.get(kind, 320), height - TITLE_H))
        self.y += height + ROOM.get(kind, RESULT_ROOM if kind in S.BY_ID else 0) + GAP
        return node


def group(b: Builder, title: str, members: list[dict], color: str = "#3f789e") -> dict:
    """A group drawn around its members (with the room they grow into after a run)."""
    pad, head = 20, 50

    def bottom(n: dict) -> int:
        return n["pos"][1] + n["size"][1] + ROOM.get(n["type"], RESULT_ROOM if n["type"] in S.BY_ID else 0)

    x0 = min(n["pos"][0] for n in members) - pad
    y0 = min(n["pos"][1] for n in members) - TITLE_H - head
    x1 = max(n["pos"][0] + n["size"][0] for n in members) + pad
    y1 = max(bottom(n) for n in members) + pad
    return {"title": title, "bounding": [x0, y0, x1 - x0, y1 - y0], "color": color, "font_size": 24, "flags": {}}


def note(b: Builder, text: str, x: int = -480) -> dict:
    return Column(b, x).add("MarkdownNote", {"text": text}, title="Read me")


def side_step_front(b: Builder, col: Column, trigger: str = TRIGGER, auto_label: bool = False) -> tuple[dict, dict]:
    load = col.add("SideStepLoadCheckpoint", {"model": MODEL_CHOICE})
    pre = col.add("SideStepPreprocessAudio", {"trigger_tag": trigger, "auto_label": auto_label})
    b.link(load, "model", pre, "model")
    return load, pre


def train_front(b: Builder, train_values: dict, auto_label: bool = False) -> tuple[dict, dict, dict, Column, dict]:
    """Load and Preprocess in the first column, Train Adapter in the second, its loss chart atop the third:
    ``(load, preprocess, train, third column, loss chart)``."""
    load, pre = side_step_front(b, Column(b, 0), auto_label=auto_label)
    train = Column(b, COLUMN).add("SideStepTrainAdapter", train_values)
    b.link(load, "model", train, "model")
    b.link(pre, "dataset", train, "dataset")
    results = Column(b, 2 * COLUMN)
    loss = results.add("PreviewImage")
    b.link(train, "loss_curve", loss, "images")
    return load, pre, train, results, loss


def generation(b: Builder, model_source: dict, model_output: str, *, x: int, tags: str, prefix: str,
               lm_apply: Optional[dict] = None) -> dict:
    """ComfyUI's native ACE-Step 1.5 text-to-music graph (the audio_ace_step_1_5_split template), turbo values, in
    four columns from ``x``. Returns its conditioning, latent and VAE nodes (``text``, ``zero``, ``latent``,
    ``vae``) and all its nodes (``nodes``). With ``lm_apply`` (an Apply Adapter node) the CLIP goes through it, so
    the planner LM writes the audio codes with its adapter (generate_audio_codes on)."""
    loaders, encode = Column(b, x), Column(b, x + COLUMN)
    latents, sampling = Column(b, x + 2 * COLUMN + 80), Column(b, x + 3 * COLUMN + 80)  # the encoder is 400 wide
    clip = loaders.add("DualCLIPLoader", {"clip_name1": "qwen_0.6b_ace15.safetensors",
                                          "clip_name2": "qwen_1.7b_ace15.safetensors", "type": "ace",
                                          "device": "default"})
    vae = loaders.add("VAELoader", {"vae_name": "ace_1.5_vae.safetensors"})
    shift = loaders.add("ModelSamplingAuraFlow", {"shift": 3.0})
    b.link(model_source, model_output, shift, "model")
    text = encode.add("TextEncodeAceStepAudio1.5", {
        "tags": tags, "lyrics": LYRICS, "seed": 31, "bpm": 120, "duration": 60.0, "timesignature": "4",
        "language": "en", "keyscale": "C major", "generate_audio_codes": lm_apply is not None, "cfg_scale": 2.0,
        "temperature": 0.85, "top_p": 0.9, "top_k": 0, "min_p": 0.0})
    if lm_apply is not None:
        b.link(clip, "CLIP", lm_apply, "clip")
        b.link(lm_apply, "clip", text, "clip")
    else:
        b.link(clip, "CLIP", text, "clip")
    zero = latents.add("ConditioningZeroOut")
    b.link(text, "CONDITIONING", zero, "conditioning")
    latent = latents.add("EmptyAceStep1.5LatentAudio", {"seconds": 60.0, "batch_size": 1})
    sampler = sampling.add("KSampler", {"seed": 31, "steps": 8, "cfg": 1.0, "sampler_name": "euler",
                                        "scheduler": "simple", "denoise": 1.0})
    b.link(shift, "MODEL", sampler, "model")
    b.link(text, "CONDITIONING", sampler, "positive")
    b.link(zero, "CONDITIONING", sampler, "negative")
    b.link(latent, "LATENT", sampler, "latent_image")
    decode = sampling.add("VAEDecodeAudio")
    b.link(sampler, "LATENT", decode, "samples")
    b.link(vae, "VAE", decode, "vae")
    save = sampling.add("SaveAudioAdvanced", {"filename_prefix": prefix, "format": "flac"})
    b.link(decode, "AUDIO", save, "audio")
    return {"text": text, "zero": zero, "latent": latent, "vae": vae,
            "nodes": [clip, vae, shift, text, zero, latent, sampler, decode, save]}


INTRO = (
    "## Side-Step: {title}\n\n{body}\n\n"
    "**Audio**: put your songs (wav/flac/mp3…) in `ComfyUI/input/sidestep_dataset/` (or type another folder in "
    "*Preprocess Audio Folder*). A `song.txt` beside `song.wav` can give `caption:`, `bpm:`, `keyscale:`, "
    "`language:` and a final `lyrics:` block.\n\n"
    "**Models** (Comfy-Org/ace_step_1.5_ComfyUI_files): `diffusion_models/acestep_v1.5_turbo.safetensors`, "
    "`text_encoders/qwen_0.6b_ace15.safetensors` + `qwen_1.7b_ace15.safetensors`, `vae/ace_1.5_vae.safetensors`.\n\n"
    "Training settings are those of `sidestep train`; hover an input for its meaning. Cancel saves a checkpoint "
    "and the adapter; queue again with *resume* on to continue."
)


def train_then_generate(b: Builder) -> dict:
    note(b, INTRO.format(title="train, then generate", body=(
        "Preprocesses the folder, trains an adapter, applies it to the model loaded by *Load Diffusion Model* and "
        f"generates with ComfyUI's own ACE-Step 1.5 nodes, all in one queue. Put the trigger tag (`{TRIGGER}`) in "
        "the tags. The adapter is also exported to `models/loras/`.\n\n"
        "**Previews**: the same model, conditioning, latent and VAE also go into *Train Adapter*'s `preview_…` "
        "inputs, so every `preview_every` steps it renders this very generation with the adapter as it is then "
        "(`output/sidestep/<run>/previews/step_N.flac`; the node plays the last one). Disconnect them to train "
        "without previews.")))
    load, pre, train, results, loss = train_front(b, {"output_name": "my_style"})
    export = results.add("SideStepExportAdapter", {"name": "my_style"})
    b.link(train, "adapter", export, "adapter")
    model = Column(b, 3 * COLUMN + 80)  # the loss preview is 420 wide
    unet = model.add("UNETLoader", {"unet_name": DIT, "weight_dtype": "default"})
    apply = model.add("SideStepApplyAdapter")
    b.link(unet, "MODEL", apply, "model")
    b.link(train, "adapter", apply, "adapter")
    gen = generation(b, apply, "model", x=4 * COLUMN + 80, tags=f"{TRIGGER}, upbeat pop, bright synths, female vocals",
                     prefix="audio/sidestep_train_then_generate")
    b.link(unet, "MODEL", train, "preview_model")  # previews: the generation beside, with the live adapter
    b.link(gen["text"], "CONDITIONING", train, "preview_positive")
    b.link(gen["zero"], "CONDITIONING", train, "preview_negative")
    b.link(gen["latent"], "LATENT", train, "preview_latent")
    b.link(gen["vae"], "VAE", train, "preview_vae")
    return b.workflow([group(b, "1 - Data and training", [load, pre, train, loss, export]),
                       group(b, "2 - Generate with the adapter", [unet, apply, *gen["nodes"]], "#8a5a9e")])


def train_dit_and_lm(b: Builder) -> dict:
    note(b, INTRO.format(title="train the DiT and the planner LM", body=(
        "Trains two adapters in one run (*Train Adapter* with `train_models` both): the DiT's, which shapes the "
        "sound, and a LoRA on the 5 Hz planner LM (`qwen_1.7b_ace15`), which shapes what the LM decides before "
        "the DiT renders: song structure, phrasing, vocal placement, tempo and key, even the vocal gender. "
        "*Apply Adapter* then patches the model and the CLIP's LM, and *TextEncodeAceStepAudio1.5* runs with "
        "`generate_audio_codes` on, so the LM writes the audio codes with its adapter. *Preprocess* has "
        "`auto_label` on: a song without a caption, bpm, key, time signature or language gets them from the same "
        "LM, in an editable `song.labels.txt` beside it (what you wrote always wins).\n\n"
        "The LM adds memory (the 1.7B LM in bf16, about 4 GB more) and time per step; train the DiT alone "
        "(`train_models` dit) when the sound is all you want to change. `planner_lm` auto picks the LM in "
        "`models/text_encoders/`.")))
    load, pre, train, results, loss = train_front(b, {"output_name": "my_style_with_lm", "train_models": "both"},
                                                  auto_label=True)
    export = results.add("SideStepExportAdapter", {"name": "my_style_with_lm"})
    b.link(train, "adapter", export, "adapter")
    model = Column(b, 3 * COLUMN + 80)
    unet = model.add("UNETLoader", {"unet_name": DIT, "weight_dtype": "default"})
    apply = model.add("SideStepApplyAdapter")
    b.link(unet, "MODEL", apply, "model")
    b.link(train, "adapter", apply, "adapter")
    gen = generation(b, apply, "model", x=4 * COLUMN + 80, tags=f"{TRIGGER}, upbeat pop, bright synths, female vocals",
                     prefix="audio/sidestep_train_dit_and_lm", lm_apply=apply)
    return b.workflow([group(b, "1 - Data and training (DiT + planner LM)", [load, pre, train, loss, export]),
                       group(b, "2 - Generate with both adapters, audio codes on", [unet, apply, *gen["nodes"]],
                             "#8a5a9e")])


def preprocess_and_train(b: Builder) -> dict:
    note(b, INTRO.format(title="preprocess and train", body=(
        "Encodes the folder once (cached by content: queueing again is instant, edited files alone are "
        "re-encoded), trains an adapter and exports it to `models/loras/` for ComfyUI's LoRA loaders or "
        "*Apply Adapter*.")))
    load, pre, train, results, loss = train_front(b, {"output_name": "my_style"})
    export = results.add("SideStepExportAdapter", {"name": "my_style"})
    b.link(train, "adapter", export, "adapter")
    return b.workflow([group(b, "Preprocess, train, export", [load, pre, train, loss, export])])


def estimate_then_train(b: Builder) -> dict:
    note(b, INTRO.format(title="estimate, then train", body=(
        "*Estimate Gradients* measures which DiT modules your data pulls on most; *Train Adapter* then trains "
        "only its top modules with ranks scaled to their share. The ranking is shown as text.")))
    load, pre = side_step_front(b, Column(b, 0))
    estimation = Column(b, COLUMN)
    est = estimation.add("SideStepEstimateGradients")
    b.link(load, "model", est, "model")
    b.link(pre, "dataset", est, "dataset")
    ranking = estimation.add("PreviewAny")
    b.link(est, "ranking", ranking, "source")
    train = Column(b, 2 * COLUMN).add("SideStepTrainAdapter", {"output_name": "my_style_estimated"})
    b.link(load, "model", train, "model")
    b.link(pre, "dataset", train, "dataset")
    b.link(est, "estimate", train, "estimate")
    results = Column(b, 3 * COLUMN)
    loss = results.add("PreviewImage")
    b.link(train, "loss_curve", loss, "images")
    export = results.add("SideStepExportAdapter", {"name": "my_style_estimated"})
    b.link(train, "adapter", export, "adapter")
    return b.workflow([group(b, "Estimate, train, export", [load, pre, est, ranking, train, loss, export])])


def apply_saved_adapter(b: Builder) -> dict:
    note(b, ("## Side-Step: apply a saved adapter\n\nPick an exported adapter from `models/loras/` in *Apply "
             "Adapter* (or use ComfyUI's *LoraLoaderModelOnly*: the files carry their alpha, so both give the same "
             "result). The advanced inputs scale self-attention, cross-attention and MLP modules separately. "
             f"Put the adapter's trigger tag (`{TRIGGER}` in the other examples) in the tags."))
    model = Column(b, 0)
    unet = model.add("UNETLoader", {"unet_name": DIT, "weight_dtype": "default"})
    apply = model.add("SideStepApplyAdapter", {"lora_name": "my_style.safetensors"})
    b.link(unet, "MODEL", apply, "model")
    gen = generation(b, apply, "model", x=COLUMN, tags=f"{TRIGGER}, upbeat pop, bright synths, female vocals",
                     prefix="audio/sidestep_apply_saved_adapter")
    return b.workflow([group(b, "Apply a saved adapter and generate", [unet, apply, *gen["nodes"]], "#8a5a9e")])


def train_compare_export(b: Builder) -> dict:
    note(b, INTRO.format(title="train, compare by ear, export the choice", body=(
        "Trains with previews, then *Compare Adapters* renders this very generation for the run's last 3 "
        "checkpoints at strengths 0.5, 0.8 and 1.0 with one seed: click the grid's buttons on the node to listen "
        "(rows: checkpoints, columns: strengths). The loss chart marks the compared checkpoints; the table lists "
        "them. It says what the renders will cost before it starts, and Cancel stops it between renders.\n\n"
        "**Pick one**: type the row you liked (e.g. `step_700`, `final` or `ema`) into `checkpoint` of *Export "
        "Adapter* (writes `models/loras/my_style.safetensors`) and of *Apply Adapter* (generates with it), then "
        "queue again: the trained run and the grid are reused, only the export and the generation run.")))
    load, pre, train, results, loss = train_front(b, {"output_name": "my_style"})
    unet = results.add("UNETLoader", {"unet_name": DIT, "weight_dtype": "default"})
    grid = Column(b, 3 * COLUMN + 80)  # the loss preview is 420 wide
    compare = grid.add("SideStepCompareAdapters", {"checkpoints": "last 3", "strengths": "0.5, 0.8, 1.0",
                                                   "seed": 31})
    b.link(train, "adapter", compare, "adapter")
    b.link(unet, "MODEL", compare, "model")
    table = grid.add("PreviewAny")
    b.link(compare, "table", table, "source")
    outputs = Column(b, 4 * COLUMN + 80)
    chart = outputs.add("PreviewImage")
    b.link(compare, "loss_curve", chart, "images")
    save_grid = outputs.add("SaveAudioAdvanced", {"filename_prefix": "audio/sidestep_compare", "format": "flac"})
    b.link(compare, "audio", save_grid, "audio")
    choice = Column(b, 5 * COLUMN + 160)  # the chart preview is 420 wide
    export = choice.add("SideStepExportAdapter", {"name": "my_style"})
    b.link(train, "adapter", export, "adapter")
    apply = choice.add("SideStepApplyAdapter")
    b.link(unet, "MODEL", apply, "model")
    b.link(train, "adapter", apply, "adapter")
    gen = generation(b, apply, "model", x=6 * COLUMN + 160, tags=f"{TRIGGER}, upbeat pop, bright synths, female vocals",
                     prefix="audio/sidestep_train_compare_export")
    b.link(unet, "MODEL", train, "preview_model")
    for node, prefix in ((train, "preview_"), (compare, "")):  # previews and the grid: this generation
        b.link(gen["text"], "CONDITIONING", node, f"{prefix}positive")
        b.link(gen["zero"], "CONDITIONING", node, f"{prefix}negative")
        b.link(gen["latent"], "LATENT", node, f"{prefix}latent")
        b.link(gen["vae"], "VAE", node, f"{prefix}vae")
    return b.workflow([group(b, "1 - Train with previews", [load, pre, train, loss]),
                       group(b, "2 - Compare by ear", [unet, compare, table, chart, save_grid], "#3f9e6a"),
                       group(b, "3 - Export the chosen one and generate with it", [export, apply, *gen["nodes"]],
                             "#8a5a9e")])


def label(name: str) -> str:
    return name.replace("_", " ")


def locales() -> dict:
    """``locales/en/main.json``: display names, descriptions, input labels and tooltips of the pack's nodes."""
    defs = {}
    for node in S.NODES:
        inputs = {}
        for i in node.inputs:
            entry = {"name": label(i.name)}
            if i.tooltip:
                entry["tooltip"] = i.tooltip
            inputs[i.name] = entry
        outputs = {str(n): {"name": o.name, **({"tooltip": o.tooltip} if o.tooltip else {})}
                   for n, o in enumerate(node.outputs)}
        defs[node.node_id] = {"display_name": node.display_name, "description": node.description,
                              "inputs": inputs, "outputs": outputs}
    return {"nodeDefs": defs}


# What each template does, drawn on its thumbnail: the Templates dialog (frontend 1.45) shows a custom node pack's
# template under its file name, with that name again as its description, and reads nothing else from the pack.
SUMMARIES = {
    "train_then_generate": "Train an adapter on your songs, hear previews while it learns, then generate with it",
    "preprocess_and_train": "Encode a folder of songs once, train an adapter, export it to models/loras",
    "estimate_then_train": "Find the modules your data pulls on most, then train only those",
    "apply_saved_adapter": "Generate with an exported adapter in ComfyUI's ACE-Step 1.5 graph",
    "train_compare_export": "Train, listen to checkpoints x strengths in a grid, export the one you like",
    "train_dit_and_lm": "Train the DiT and the 5 Hz planner LM together, then generate with audio codes on",
}
THUMB_SIZE = (400, 300)


def thumbnail(name: str, workflow: dict):
    """The template's card: its graph in miniature (Side-Step nodes highlighted, links drawn) under what it does."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = THUMB_SIZE
    img = Image.new("RGB", (w, h), (24, 24, 30))
    draw = ImageDraw.Draw(img)
    nodes = [n for n in workflow["nodes"] if n["type"] != "MarkdownNote"]
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] for n in nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    area = (16, 100, w - 16, h - 14)
    scale = min((area[2] - area[0]) / (x1 - x0), (area[3] - area[1]) / (y1 - y0))

    def box(n):
        left = area[0] + (n["pos"][0] - x0) * scale
        top = area[1] + (n["pos"][1] - y0) * scale
        return left, top, left + n["size"][0] * scale, top + n["size"][1] * scale

    boxes = {n["id"]: box(n) for n in nodes}
    for _, src, _, dst, _, _ in workflow["links"]:
        if src in boxes and dst in boxes:
            a, b = boxes[src], boxes[dst]
            draw.line([(a[2], (a[1] + a[3]) / 2), (b[0], (b[1] + b[3]) / 2)], fill=(110, 110, 130), width=1)
    for n in nodes:
        ours = n["type"] in S.BY_ID
        draw.rounded_rectangle(boxes[n["id"]], radius=3, fill=(60, 110, 170) if ours else (64, 64, 74),
                               outline=(150, 190, 240) if ours else (110, 110, 122))
    title = ImageFont.load_default(size=24)
    body = ImageFont.load_default(size=15)
    draw.text((16, 12), label(name).capitalize(), font=title, fill=(240, 240, 245))
    words, lines = SUMMARIES[name].split(), [""]
    for word in words:
        line = f"{lines[-1]} {word}".strip()
        if draw.textlength(line, font=body) > w - 32:
            lines.append(word)
        else:
            lines[-1] = line
    for i, line in enumerate(lines[:3]):
        draw.text((16, 46 + 18 * i), line, font=body, fill=(190, 190, 200))
    return img


WORKFLOWS = {
    "train_then_generate": train_then_generate,
    "preprocess_and_train": preprocess_and_train,
    "estimate_then_train": estimate_then_train,
    "apply_saved_adapter": apply_saved_adapter,
    "train_compare_export": train_compare_export,
    "train_dit_and_lm": train_dit_and_lm,
}


def dumps(obj: dict) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def build(name: str) -> tuple[dict, dict[int, dict[str, Any]]]:
    """A template and what it means: its UI-format workflow and, per node id, each widget's intended value by name
    (a seed's control value as ``<seed>.control_after_generate``); the browser tests compare the front end's reading
    of the file with the latter."""
    b = Builder()
    return WORKFLOWS[name](b), b.intended


def generated_files() -> dict[Path, str]:
    files = {OUT / f"{name}.json": dumps(build(name)[0]) for name in WORKFLOWS}
    files[ROOT / "locales" / "en" / "main.json"] = dumps(locales())
    return files


def main() -> None:
    for path, text in generated_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path.relative_to(ROOT))
    for name in WORKFLOWS:  # thumbnails: JPEG bytes vary between Pillow versions, so they are not compared
        path = OUT / f"{name}.jpg"
        thumbnail(name, build(name)[0]).save(path, quality=85, optimize=True)
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
