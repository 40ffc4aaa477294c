"""Training presets: named partial ``TrainConfig`` settings.

A preset holds training settings only — never paths, devices or resume state (``config.RUN_ONLY_FIELDS``); the
fields it does not set keep ``TrainConfig``'s defaults. Presets are looked up, first match wins, in

1. the project folder: ``./sidestep_presets/`` (relative to the working directory),
2. the user folder: ``$SIDESTEP_CONFIG_DIR/presets``, else ``%APPDATA%\\sidestep\\presets`` on Windows,
   ``~/Library/Application Support/sidestep/presets`` on macOS, ``$XDG_CONFIG_HOME/sidestep/presets``
   (``~/.config/sidestep/presets``) elsewhere,
3. the built-in presets below.

A preset file is ``<name>.json``: ``{"format": "sidestep-preset", "format_version": 1, "name": …,
"description": …, "settings": {…}}``. Settings precedence when a run is configured:
TrainConfig defaults < preset < ``--config`` file < command-line options (:func:`compose_config`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from .config import RUN_ONLY_FIELDS, TrainConfig
from .fsutil import atomic_write_json

FORMAT = "sidestep-preset"
FORMAT_VERSION = 1
PROJECT_DIRNAME = "sidestep_presets"
MAX_FILE_BYTES = 1 << 20
SCOPES = ("project", "user")

_COMMON = {"adapter": "lora", "attention": "both", "optimizer": "adamw", "scheduler": "cosine",
           "timestep_mode": "continuous", "cfg_ratio": 0.15, "precision": "bf16"}

BUILTIN: dict[str, dict[str, Any]] = {
    "recommended": {
        "description": "Balanced default: LoRA r64/α128 on attention and MLP, lr 1e-4, 1×4 batches, 60 s crops.",
        "settings": {**_COMMON, "rank": 64, "alpha": 128.0, "dropout": 0.1, "target_mlp": True,
                     "learning_rate": 1e-4, "batch_size": 1, "gradient_accumulation": 4, "epochs": 200,
                     "warmup_steps": 100, "crop_seconds": 60.0, "gradient_checkpointing": True,
                     "checkpointing_ratio": 1.0, "save_every": 200},
    },
    "quick_test": {
        "description": "Smoke test (about two minutes on a GPU): LoRA r16 on attention, 50 steps, 20 s crops, "
                       "no checkpoints.",
        "settings": {**_COMMON, "rank": 16, "alpha": 32.0, "dropout": 0.0, "target_mlp": False,
                     "learning_rate": 2e-4, "batch_size": 1, "gradient_accumulation": 1, "max_steps": 50,
                     "warmup_steps": 5, "crop_seconds": 20.0, "gradient_checkpointing": True, "save_every": 0,
                     "estimate_steps": 0, "histogram_every": 0},
    },
    "high_quality": {
        "description": "Slower, higher capacity: LoRA r128/α256 on attention and MLP, lr 5e-5, 400 epochs.",
        "settings": {**_COMMON, "rank": 128, "alpha": 256.0, "dropout": 0.05, "target_mlp": True,
                     "learning_rate": 5e-5, "batch_size": 1, "gradient_accumulation": 4, "epochs": 400,
                     "warmup_steps": 200, "crop_seconds": 60.0, "gradient_checkpointing": True,
                     "save_every": 250},
    },
    "vram_24gb_plus": {
        "description": "24 GB or more: r128, batches of 2, no activation checkpointing.",
        "settings": {**_COMMON, "rank": 128, "alpha": 256.0, "dropout": 0.1, "target_mlp": True,
                     "learning_rate": 1e-4, "batch_size": 2, "gradient_accumulation": 2, "epochs": 200,
                     "warmup_steps": 100, "crop_seconds": 60.0, "gradient_checkpointing": False,
                     "save_every": 200},
    },
    "vram_16gb": {
        "description": "16 GB: r64, batch 1 × 4, activation checkpointing on half the layers.",
        "settings": {**_COMMON, "rank": 64, "alpha": 128.0, "dropout": 0.1, "target_mlp": True,
                     "learning_rate": 1e-4, "batch_size": 1, "gradient_accumulation": 4, "epochs": 200,
                     "warmup_steps": 100, "crop_seconds": 60.0, "gradient_checkpointing": True,
                     "checkpointing_ratio": 0.5, "save_every": 200},
    },
    "vram_12gb": {
        "description": "12 GB: r32, batch 1 × 4, full activation checkpointing, 45 s crops.",
        "settings": {**_COMMON, "rank": 32, "alpha": 64.0, "dropout": 0.1, "target_mlp": True,
                     "learning_rate": 1e-4, "batch_size": 1, "gradient_accumulation": 4, "epochs": 200,
                     "warmup_steps": 100, "crop_seconds": 45.0, "gradient_checkpointing": True,
                     "checkpointing_ratio": 1.0, "save_every": 200},
    },
    "vram_8gb": {
        "description": "8 GB: r16 on attention only, batch 1 × 8, full activation checkpointing, 30 s crops.",
        "settings": {**_COMMON, "rank": 16, "alpha": 32.0, "dropout": 0.1, "target_mlp": False,
                     "learning_rate": 1e-4, "batch_size": 1, "gradient_accumulation": 8, "epochs": 200,
                     "warmup_steps": 100, "crop_seconds": 30.0, "gradient_checkpointing": True,
                     "checkpointing_ratio": 1.0, "save_every": 200},
    },
    "dit_and_lm": {
        "description": "The recommended DiT adapter plus a LoRA r16 on the 5 Hz planner LM (structure, phrasing, "
                       "tempo, key, vocals), trained together; needs the LM (--lm) and about 4 GB more.",
        "settings": {**_COMMON, "rank": 64, "alpha": 128.0, "dropout": 0.1, "target_mlp": True,
                     "learning_rate": 1e-4, "batch_size": 1, "gradient_accumulation": 4, "epochs": 200,
                     "warmup_steps": 100, "crop_seconds": 60.0, "gradient_checkpointing": True,
                     "checkpointing_ratio": 1.0, "save_every": 200, "train_models": "both", "lm_rank": 16,
                     "lm_alpha": 32.0, "lm_dropout": 0.05, "lm_learning_rate": 1e-4, "lm_loss": "codes"},
    },
    "lm_only": {
        "description": "Only a LoRA r16 on the 5 Hz planner LM (the DiT is not loaded): for a DiT adapter that "
                       "already sounds right but whose songs are structured or sung unlike the dataset.",
        "settings": {**_COMMON, "train_models": "lm", "lm_rank": 16, "lm_alpha": 32.0, "lm_dropout": 0.05,
                     "lm_learning_rate": 1e-4, "lm_loss": "codes", "batch_size": 1, "gradient_accumulation": 4,
                     "epochs": 100, "warmup_steps": 50, "gradient_checkpointing": True, "save_every": 200},
    },
}

# The card each memory-tier preset is meant for (GB), checked by the memory plan at the 2B and XL shapes.
VRAM_TIERS = {"vram_8gb": 8, "vram_12gb": 12, "vram_16gb": 16, "vram_24gb_plus": 24}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


class PresetError(ValueError):
    """A preset that cannot be found, read or saved (the message names the preset or its file)."""


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    settings: dict
    scope: str  # project | user | builtin
    path: Optional[Path] = None

    def config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.settings).validate()

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "name": self.name,
                "description": self.description, "settings": dict(self.settings)}


# ----------------------------------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------------------------------


def project_dir(cwd: Optional[str | Path] = None) -> Path:
    return Path(cwd or os.getcwd()) / PROJECT_DIRNAME


def user_dir() -> Path:
    env = os.environ.get("SIDESTEP_CONFIG_DIR")
    if env:
        return Path(env).expanduser() / "presets"
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "sidestep" / "presets"


def _dirs(project: Optional[Path], user: Optional[Path]) -> list[tuple[str, Path]]:
    return [("project", Path(project) if project else project_dir()), ("user", Path(user) if user else user_dir())]


# ----------------------------------------------------------------------------------------------------------
# names and settings
# ----------------------------------------------------------------------------------------------------------


def clean_name(name: str) -> str:
    """A safe file name for a preset: spaces become ``_``; anything but letters, digits, ``_ . -`` is refused."""
    cleaned = str(name).strip().replace(" ", "_")
    if not _NAME.match(cleaned) or ".." in cleaned or cleaned.lower().split(".")[0] in _WINDOWS_RESERVED:
        raise PresetError(f"preset name {name!r}: use 1–64 letters, digits, '_', '.' or '-', starting with a "
                          "letter or digit")
    return cleaned


def validate_settings(settings: Mapping[str, Any], where: str = "preset", *, drop_run_fields: bool = False
                      ) -> dict[str, Any]:
    """Check a preset's settings: known TrainConfig fields, no run-only fields (paths, device, resume), values that
    validate. Returns the settings with values coerced to their field types."""
    if not isinstance(settings, Mapping):
        raise PresetError(f"{where}: settings must be a JSON object")
    run_only = sorted(set(settings) & RUN_ONLY_FIELDS)
    if run_only and not drop_run_fields:
        raise PresetError(f"{where}: presets cannot hold paths or device settings ({', '.join(run_only)})")
    kept = {k: v for k, v in settings.items() if k not in RUN_ONLY_FIELDS}
    try:
        cfg = TrainConfig.from_dict(kept)
        cfg.validate()
    except ValueError as exc:
        raise PresetError(f"{where}: {exc}") from exc
    full = cfg.to_dict(include_run=False)
    return {k: full[k] for k in kept}


def _read_file(path: Path, scope: str) -> Preset:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise PresetError(f"{path}: larger than 1 MiB, not a preset")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PresetError(f"{path}: not a readable preset ({exc})") from exc
    if not isinstance(data, dict):
        raise PresetError(f"{path}: a preset is a JSON object")
    settings = data.get("settings", {k: v for k, v in data.items() if k not in ("name", "description", "format",
                                                                               "format_version")})
    settings = validate_settings(settings, str(path))
    return Preset(path.stem, str(data.get("description", "")), settings, scope, path)


# ----------------------------------------------------------------------------------------------------------
# lookup
# ----------------------------------------------------------------------------------------------------------


def all_presets(project: Optional[Path] = None, user: Optional[Path] = None) -> list[Preset]:
    """Every visible preset, project first, then user, then built-in; a name defined in several places appears once
    (the first). Files that do not read as presets are skipped (``get_preset`` reports them)."""
    seen: dict[str, Preset] = {}
    for scope, folder in _dirs(project, user):
        if folder.is_dir():
            for path in sorted(folder.glob("*.json")):
                if path.stem in seen:
                    continue
                try:
                    seen[path.stem] = _read_file(path, scope)
                except PresetError:
                    continue
    for name, spec in BUILTIN.items():
        seen.setdefault(name, Preset(name, spec["description"], dict(spec["settings"]), "builtin"))
    return list(seen.values())


def list_presets(project: Optional[Path] = None, user: Optional[Path] = None) -> list[str]:
    """Names of every visible preset (built-in ones first, then the user's, alphabetically)."""
    presets = all_presets(project, user)
    builtin = [p.name for p in presets if p.name in BUILTIN]
    own = sorted(p.name for p in presets if p.name not in BUILTIN)
    return builtin + own


preset_names = list_presets


def get_preset(name: str, project: Optional[Path] = None, user: Optional[Path] = None) -> Preset:
    name = clean_name(name)
    for scope, folder in _dirs(project, user):
        path = folder / f"{name}.json"
        if path.is_file():
            return _read_file(path, scope)
    if name in BUILTIN:
        spec = BUILTIN[name]
        return Preset(name, spec["description"], dict(spec["settings"]), "builtin")
    known = ", ".join(list_presets(project, user))
    raise PresetError(f"preset {name!r} not found (known: {known})")


def preset_settings(name: str, project: Optional[Path] = None, user: Optional[Path] = None) -> dict[str, Any]:
    return dict(get_preset(name, project, user).settings)


def load_preset(name: str, project: Optional[Path] = None, user: Optional[Path] = None) -> TrainConfig:
    """``TrainConfig`` defaults with the preset's settings applied (validated)."""
    return get_preset(name, project, user).config()


def save_preset(name: str, settings: Mapping[str, Any] | TrainConfig, *, description: str = "",
                scope: str = "project", overwrite: bool = False, project: Optional[Path] = None,
                user: Optional[Path] = None, drop_run_fields: bool = True) -> Path:
    """Write a preset file. A ``TrainConfig`` is stored whole (minus run fields); a mapping is stored as given.
    Built-in names cannot be reused; an existing file needs ``overwrite``."""
    name = clean_name(name)
    if scope not in SCOPES:
        raise PresetError(f"scope: must be one of {', '.join(SCOPES)}")
    if name in BUILTIN:
        raise PresetError(f"preset {name!r} is built in; choose another name")
    if isinstance(settings, TrainConfig):
        settings = settings.to_dict(include_run=False)
    clean = validate_settings(settings, f"preset {name!r}", drop_run_fields=drop_run_fields)
    folder = dict(_dirs(project, user))[scope]
    path = folder / f"{name}.json"
    if path.exists() and not overwrite:
        raise PresetError(f"{path}: exists; pass overwrite to replace it")
    atomic_write_json(path, Preset(name, description, clean, scope, path).to_dict())
    return path


def delete_preset(name: str, *, scope: Optional[str] = None, project: Optional[Path] = None,
                  user: Optional[Path] = None) -> Path:
    name = clean_name(name)
    for sc, folder in _dirs(project, user):
        if scope not in (None, sc):
            continue
        path = folder / f"{name}.json"
        if path.is_file():
            path.unlink()
            return path
    if name in BUILTIN:
        raise PresetError(f"preset {name!r} is built in and cannot be deleted")
    raise PresetError(f"preset {name!r} not found" + (f" in the {scope} folder" if scope else ""))


# ----------------------------------------------------------------------------------------------------------
# composing a run's configuration
# ----------------------------------------------------------------------------------------------------------


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A ``--config`` JSON file: a TrainConfig mapping, a run's ``training_config.json`` (its ``config`` object is
    used) or a preset file (its ``settings``)."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON config ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file is a JSON object of settings")
    if "settings" in data and isinstance(data["settings"], dict) and data.get("format") == FORMAT:
        data = data["settings"]  # a preset file works as a config file too
    elif isinstance(data.get("config"), dict) and ("model" in data or "adapter" in data or "plan" in data):
        data = data["config"]  # a run's training_config.json
    try:
        TrainConfig.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return data


def compose_config(preset: Optional[str] = None, config_file: Optional[str | Path] = None,
                   overrides: Optional[Mapping[str, Any]] = None, *, project: Optional[Path] = None,
                   user: Optional[Path] = None) -> TrainConfig:
    """TrainConfig defaults < preset < config file < ``overrides`` (e.g. the options given on the command line),
    validated."""
    data: dict[str, Any] = {}
    if preset:
        data.update(preset_settings(preset, project, user))
    if config_file:
        data.update(read_config_file(config_file))
    if overrides:
        data.update(overrides)
    return TrainConfig.from_dict(data).validate()
