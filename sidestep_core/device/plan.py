"""The memory plan: peak device memory of a training step, before any weight is read.

Only the architecture is needed (``config.json``, or the shapes in the safetensors headers). The estimate is

- **weights**: every decoder tensor at its base precision (the linears ``load.quantized_names`` quantized, the rest
  in the training dtype), minus offloaded layers plus the two layers in flight (the running one and the prefetched
  one);
- **adapter**: its fp32 parameters and optimizer state (bytes per parameter of the optimizer);
- **step**: the peak of everything a step creates — activations, saved tensors, recomputation, dequantized weights,
  adapter gradients — *measured* by running the real decoder with the real adapter (PEFT / LyCORIS) forward and
  backward at the real shape on fake tensors (``FakeTensorMode``: shapes and dtypes, no storage), with a dispatch
  mode that counts the bytes of every live storage; with ``fused_backward`` the training's own gradient hooks free
  each gradient as it is complete (the optimizer state they update is counted in *adapter*);
- **slack**: on CUDA, 5 % + 256 MiB for the caching allocator's fragmentation and kernels' workspaces, which
  ``max_memory_allocated`` does not show but the free memory must cover.

A run that trains the planner LM too carries the LM's plan (:mod:`.plan_lm`) in ``MemoryPlan.lm``: the peak is then
the joint run's (:func:`.plan_lm.joint_peak`), and every check and choice below is made against it.

The measured step runs on fake CPU tensors, so attention kernels are CPU's: on a GPU the step part is an
approximation (the test on a GPU compares against ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..config import BASE_PRECISIONS, TrainConfig
from ..model.config import AceStepConfig
from .quant import (
    BYTES_PER_WEIGHT,
    DEQUANT_CHUNK,
    FP8,
    NF4_BLOCK,
    NF4_SCALE_BLOCK,
    NF4_TABLE_BYTES,
    ROW_SCALE_BYTES,
    QuantLinear,
    keep_oft_rebuild,
)

if TYPE_CHECKING:
    from .plan_lm import LMMemoryPlan

GIB = 2**30
MIB = 2**20
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# optimizer state per trainable parameter; adamw8bit: two 8-bit states, each with an fp32 absmax per 256 values
# (bitsandbytes keeps 32-bit state for tensors under 4096 values, which no LoRA factor of rank >= 2 at the real
# shapes is)
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2 + 2 * 4 / 256, "adafactor": 1, "prodigy": 16}
CONDITION_TOKENS = 512  # condition length assumed when no dataset tells (caption + lyrics + timbre)
IN_FLIGHT_LAYERS = 2  # offload: the running layer and the prefetched one
CUDA_RESERVED = 512 * MIB  # a card's memory the allocator cannot have: CUDA context, cuBLAS/cuDNN, display


def size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 4 else f"{n / MIB:.1f} MiB"


@dataclass
class MemoryPlan:
    base_precision: str
    offload_layers: int
    weights: int
    adapter: int
    step: int
    trainable_params: int
    free: Optional[int] = None  # device memory free now (None: unknown / not asked)
    device: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    fused_backward: bool = False
    lm: Optional[LMMemoryPlan] = None  # the run trains the planner LM beside the DiT

    @property
    def peak(self) -> int:
        """Estimated peak allocated bytes (what ``torch.cuda.max_memory_allocated`` reports), both models' in a
        run that trains the planner LM too."""
        if self.lm is not None:
            from .plan_lm import joint_peak

            return joint_peak(self, self.lm)
        return self.weights + self.adapter + self.step

    @property
    def lm_share(self) -> int:
        """What the planner LM adds to the DiT's peak (0 without it)."""
        return self.peak - (self.weights + self.adapter + self.step)

    @property
    def slack(self) -> int:
        return slack_bytes(self.peak, self.device)

    @property
    def needed(self) -> int:
        return self.peak + self.slack

    @property
    def fits(self) -> Optional[bool]:
        return None if self.free is None else self.needed <= self.free

    @property
    def label(self) -> str:
        return (f"{self.base_precision} base" + (f" + offload {self.offload_layers} layers" if self.offload_layers
                                                 else "") + (" + fused backward" if self.fused_backward else ""))

    def describe(self) -> str:
        parts = f"weights {size(self.weights)}, adapter+optimizer {size(self.adapter)}, step {size(self.step)}"
        if self.lm is not None:
            lm = self.lm
            parts = (f"DiT {parts}; planner LM {size(self.lm_share)} more: weights {size(lm.weights)} in "
                     f"{lm.settings['dtype']}, LoRA+optimizer {size(lm.adapter)}, {lm.step_text()}, its gradients "
                     "kept through the DiT's step")
        text = (f"{self.label}{' + planner LM' if self.lm is not None else ''}: {size(self.needed)} ({parts}; "
                f"slack {size(self.slack)})")
        if self.free is not None:
            text += f"; {self.device} has {size(self.free)} free"
        return text

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(peak=self.peak, slack=self.slack, needed=self.needed)
        return out


# ----------------------------------------------------------------------------------------------------------
# counting live storages
# ----------------------------------------------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created by ops while active (each storage once, until it is freed)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def known(self, tensors) -> None:
        """Storages that exist already (weights, inputs): never counted, also not through their views."""
        for t in tensors:
            self._seen.setdefault(t.untyped_storage(), 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if id(st) in inputs or st in self._seen:
                    continue
                nbytes = st.nbytes()
                self._seen[st] = nbytes
                weakref.finalize(st, self._freed, nbytes)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
        return out


def make_fake(model: torch.nn.Module) -> None:
    """Give a meta-device model fake parameters and buffers of the same shapes, dtypes and ``requires_grad`` (inside
    a ``FakeTensorMode``), so a forward and backward can run on it without memory."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                              requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


# ----------------------------------------------------------------------------------------------------------
# the estimate
# ----------------------------------------------------------------------------------------------------------


def _decoder_tensors(config: AceStepConfig) -> tuple[list[tuple[str, tuple[int, ...]]], set[str]]:
    """Every decoder tensor's (key, shape), and the names of the linears quantized below bf16."""
    from ..model.dit import AceStepDiT
    from .load import quantized_names

    with torch.device("meta"):
        decoder = AceStepDiT(config)
    return [(k, tuple(v.shape)) for k, v in decoder.state_dict().items()], set(quantized_names(decoder))


def weight_bytes(config: AceStepConfig, base_precision: str, compute_dtype: torch.dtype,
                 offload_layers: int = 0) -> int:
    """Device bytes of the frozen decoder (+ null condition) at ``base_precision``."""
    elem = torch.tensor([], dtype=compute_dtype).element_size()
    per_layer: dict[int, int] = {}
    other = config.enc_hidden * elem  # null_condition_emb
    tensors, quantized = _decoder_tensors(config)
    for key, shape in tensors:
        n = 1
        for s in shape:
            n *= s
        parts = key.split(".")
        module, _, leaf = key.rpartition(".")
        if module in quantized and leaf == "weight" and base_precision != "bf16":
            size = n * BYTES_PER_WEIGHT[base_precision] + shape[0] * ROW_SCALE_BYTES.get(base_precision, 0)
            if base_precision == "nf4":
                size += NF4_TABLE_BYTES
        else:
            size = n * elem
        if parts[0] == "layers":
            per_layer[int(parts[1])] = per_layer.get(int(parts[1]), 0) + int(size)
        else:
            other += int(size)
    n_off = min(offload_layers, len(per_layer))
    resident = sum(b for i, b in per_layer.items() if i >= n_off)
    in_flight = max(per_layer.values()) * min(IN_FLIGHT_LAYERS, n_off) if n_off else 0
    return other + resident + in_flight


def _fake_step(config: AceStepConfig, cfg: TrainConfig, base_precision: str, frames: int, cond_tokens: int,
               ratio: float, recompute_last: bool) -> tuple[int, int]:
    """(peak bytes created by one forward+backward, trainable parameters), on fake tensors.

    The decoder and the adapter are built on the meta device (PEFT and LyCORIS move modules around while
    injecting, which fake parameters do not allow), then every tensor is swapped for a fake CPU tensor of the same
    shape and dtype so autocast and the CPU kernels' shape rules apply as in a real step."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..model.attention import clear_mask_caches
    from ..model.dit import AceStepDiT
    from ..training.adapters import inject_adapter
    from ..training.fused import FusedBackward
    from .load import quantized_names

    dtype = DTYPES[cfg.precision]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the frozen base in the training dtype, as the loader leaves it
    try:
        with torch.device("meta"):
            decoder = AceStepDiT(config)
            if base_precision != "bf16":
                for name in quantized_names(decoder):
                    owner, _, attr = name.rpartition(".")
                    lin = decoder.get_submodule(name)
                    setattr(decoder.get_submodule(owner), attr, _PlannedQuantLinear.like(lin, base_precision, dtype))
    finally:
        torch.set_default_dtype(default)
    decoder.requires_grad_(False)
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    with torch.device("meta"):  # LyCORIS creates its tensors on the default device
        adapter = inject_adapter(decoder, cfg)
    keep_oft_rebuild(adapter)
    decoder.checkpoint_ratio, decoder.recompute_last = ratio, recompute_last
    adapter.module.train()
    n_params = adapter.num_parameters()
    with FakeTensorMode(allow_non_fake_inputs=True):
        make_fake(adapter.module)
        trainable = [p for p in adapter.module.parameters() if p.requires_grad]
        fused = FusedBackward(trainable, None) if cfg.fused_backward else None  # frees each gradient as training's
        b = cfg.batch_size
        x_t = torch.zeros(b, frames, config.audio_acoustic_hidden_dim)
        target = torch.zeros_like(x_t)
        ctx = torch.zeros(b, frames, config.in_channels - config.audio_acoustic_hidden_dim)
        cond = torch.zeros(b, cond_tokens, config.enc_hidden)
        t = torch.zeros(b, dtype=dtype)
        counter = LiveBytes()
        counter.known([*adapter.module.parameters(), *adapter.module.buffers(), x_t, target, ctx, cond, t])
        try:
            with counter:
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    pred = adapter.module(hidden_states=x_t, timestep=t, timestep_r=t, encoder_hidden_states=cond,
                                          context_latents=ctx)
                loss = (pred.float() - target).square().mean()
                loss.backward()
                del pred, loss
        finally:
            clear_mask_caches()  # drop the fake attention masks the step cached
            if fused is not None:
                fused.remove()
    return counter.peak, n_params


class _PlannedQuantLinear(QuantLinear):
    """A ``QuantLinear`` with storage of the real size whose dequantization allocates what the real one does (W in
    the compute dtype, and for fp8 / int8 one chunk's fp32 temporaries): the planned step then holds the bytes a real
    one does (quantizing fake data would need each library's fake kernels)."""

    @classmethod
    def like(cls, lin: torch.nn.Linear, kind: str, dtype: torch.dtype) -> "_PlannedQuantLinear":
        out_f, in_f = lin.out_features, lin.in_features
        code, nested = None, (None, None, None)
        if kind == "nf4":
            q = torch.empty(out_f * in_f // 2, 1, dtype=torch.uint8)
            s = torch.empty(out_f * in_f // NF4_BLOCK, dtype=torch.uint8)
            code = torch.empty(16, dtype=torch.float32)
            blocks = -(-(out_f * in_f // NF4_BLOCK) // NF4_SCALE_BLOCK)  # ceil: the absmax blocks' own scales
            nested = (torch.empty(blocks, dtype=torch.float32), torch.empty(256, dtype=torch.float32),
                      torch.empty((), dtype=torch.float32))
        else:
            q = torch.empty(out_f, in_f, dtype=FP8 if kind == "fp8" else torch.int8)
            s = torch.empty(out_f, dtype=torch.float32)
        return cls(kind, in_f, out_f, q, s, lin.bias, dtype, code, nested)

    def dequantize(self, *tensors) -> torch.Tensor:
        out_f, in_f, dev = self.out_features, self.in_features, self.qweight.device
        if self.kind == "nf4":
            return torch.empty(out_f, in_f, dtype=self.compute_dtype, device=dev)
        # fp8 / int8 go through two fp32 temporaries: of the whole matrix, or of one chunk of rows written into W
        whole = out_f * in_f <= DEQUANT_CHUNK
        w = None if whole else torch.empty(out_f, in_f, dtype=self.compute_dtype, device=dev)
        rows = out_f if whole else max(1, DEQUANT_CHUNK // in_f)
        widened = torch.empty(rows, in_f, dtype=torch.float32, device=dev)
        scaled = torch.empty_like(widened)
        del widened
        return scaled.to(self.compute_dtype) if whole else w


def estimate(config: AceStepConfig, cfg: TrainConfig, *, base_precision: Optional[str] = None,
             offload_layers: Optional[int] = None, device: str = "cuda",
             cond_tokens: int = CONDITION_TOKENS, frames: Optional[int] = None) -> MemoryPlan:
    """Plan one training step of ``cfg`` (crop, batch, adapter, optimizer, checkpointing) on ``config``'s shape."""
    bp = base_precision or cfg.base_precision
    off = int(offload_layers if offload_layers is not None else _offload_number(cfg))
    dtype = DTYPES[cfg.precision]
    if frames is None:
        frames = max(int(round(cfg.crop_seconds * 25)), 1) if cfg.crop_seconds else 25 * 240
    weights = weight_bytes(config, bp, dtype, off)
    step, n_params = step_bytes(config, cfg, bp, frames, cond_tokens, off)
    adapter = adapter_bytes(cfg.optimizer, n_params)
    return MemoryPlan(bp, off, weights, adapter, step, n_params, device=str(device),
                      settings={"frames": frames, "batch_size": cfg.batch_size, "cond_tokens": cond_tokens,
                                "adapter": cfg.adapter, "rank": cfg.rank, "optimizer": cfg.optimizer,
                                "gradient_checkpointing": cfg.gradient_checkpointing},
                      fused_backward=cfg.fused_backward)


def adapter_bytes(optimizer: str, n_params: int) -> int:
    """fp32 trainable parameters and their optimizer state."""
    return int(n_params * (4 + OPTIMIZER_BYTES.get(optimizer, 8)))


def step_bytes(config: AceStepConfig, cfg: TrainConfig, base_precision: str, frames: int, cond_tokens: int,
               offload_layers: int = 0) -> tuple[int, int]:
    """(peak bytes a step creates, trainable parameters). Layers are alike, so the step is measured at depth 2 and
    4 and extrapolated linearly to the real depth (seconds instead of minutes); settings that name single layers
    (target_modules, rank/alpha patterns) are measured at full depth."""
    from . import recompute_last_layer

    n = config.num_hidden_layers
    ratio = max(cfg.checkpointing_ratio if cfg.gradient_checkpointing else 0.0, offload_layers / n)
    last = recompute_last_layer(cfg.fused_backward, offload_layers, n)
    if n <= 4 or cfg.target_modules or cfg.rank_pattern or cfg.alpha_pattern:
        return _fake_step(config, cfg, base_precision, frames, cond_tokens, ratio, last)
    depth = [dataclasses.replace(config, num_hidden_layers=d, layer_types=config.layer_types[:d]) for d in (2, 4)]
    (p2, n2), (p4, n4) = (_fake_step(c, cfg, base_precision, frames, cond_tokens, ratio, last) for c in depth)
    return p2 + (p4 - p2) * (n - 2) // 2, n2 + (n4 - n2) * (n - 2) // 2


def _offload_number(cfg: TrainConfig) -> int:
    return 0 if cfg.offload_layers == "auto" else int(cfg.offload_layers)


# ----------------------------------------------------------------------------------------------------------
# choosing
# ----------------------------------------------------------------------------------------------------------


def can_fuse(cfg: TrainConfig) -> bool:
    """Whether a plan may turn ``fused_backward`` on: the settings allow it and the run is one process."""
    return cfg.fused_backward_refusal() is None and int(os.environ.get("WORLD_SIZE", "1")) <= 1


def candidates(config: AceStepConfig, start: str, fused: tuple[bool, ...] = (False,)) -> list[tuple[str, int, bool]]:
    """Settings from the least change to the most: each base precision from ``start`` down (each without, then with
    the optimizer step fused into backward, when ``fused`` offers both: it changes neither the model nor the speed,
    only how clipping works), then offload."""
    order = list(BASE_PRECISIONS)
    precisions = order[order.index(start):]
    steps = sorted({n for n in (0, 2, 4, 8, 12, 16, 24, 32, config.num_hidden_layers)
                    if n <= config.num_hidden_layers})
    return [(bp, n, f) for n in steps for bp in precisions for f in fused]


def smallest_fit(config: AceStepConfig, cfg: TrainConfig, free: int, device: str,
                 start: Optional[str] = None, cache: Optional[dict] = None,
                 lm: Optional[LMMemoryPlan] = None, **kw) -> Optional[MemoryPlan]:
    """The first of ``candidates`` whose plan fits ``free`` bytes (the step part is measured once per precision);
    ``fused_backward`` is tried where the settings allow it (it stays on when they ask for it). With ``lm`` (the
    planner LM's plan) each candidate must fit beside the LM."""
    cache = {} if cache is None else cache
    fused = (True,) if cfg.fused_backward else (False, True) if can_fuse(cfg) else (False,)
    for bp, off, f in candidates(config, start or cfg.base_precision, fused):
        plan = estimate_cached(config, cfg.replace(fused_backward=f), bp, off, device, cache, **kw)
        plan.free, plan.lm = free, lm
        if plan.fits:
            return plan
    return None


def estimate_cached(config, cfg, bp, off, device, cache: dict, cond_tokens: int = CONDITION_TOKENS,
                    frames: Optional[int] = None) -> MemoryPlan:
    """``estimate`` that reuses the measured step of an earlier plan with the same precision and checkpointing."""
    from . import recompute_last_layer

    n = config.num_hidden_layers
    key = (bp, max(cfg.checkpointing_ratio if cfg.gradient_checkpointing else 0.0, off / n), cfg.fused_backward,
           recompute_last_layer(cfg.fused_backward, off, n))
    if key not in cache:
        cache[key] = estimate(config, cfg, base_precision=bp, offload_layers=off, device=device,
                              cond_tokens=cond_tokens, frames=frames)
    return dataclasses.replace(cache[key], offload_layers=off,
                               weights=weight_bytes(config, bp, DTYPES[cfg.precision], off))


def fit_on_card(config: AceStepConfig, cfg: TrainConfig, gib: float, cache: Optional[dict] = None,
                **kw) -> Optional[MemoryPlan]:
    """The least change of ``cfg`` (base precision, then offload) whose plan fits a ``gib`` GB card: its memory
    less ``CUDA_RESERVED`` (the CUDA context and kernels, which the allocator never sees)."""
    return smallest_fit(config, cfg, int(gib * GIB) - CUDA_RESERVED, "cuda", cache=cache, **kw)


def slack_bytes(peak: int, device: str) -> int:
    return int(0.05 * peak) + 256 * MIB if str(device).startswith("cuda") else 0


# ----------------------------------------------------------------------------------------------------------
# the checkpoint's shape and the device
# ----------------------------------------------------------------------------------------------------------


def checkpoint_config(path: str | Path) -> AceStepConfig:
    """The architecture from ``config.json`` or the safetensors headers — no tensor data is read."""
    from ..model.loading import CheckpointError, open_source

    src, config, _, _ = open_source(Path(path).expanduser())
    if config is None:
        try:
            config = AceStepConfig.infer_from_state_dict(src.shapes)
        except KeyError as exc:
            raise CheckpointError(f"{path}: cannot infer the architecture, tensor {exc} is missing") from exc
    return config


def free_memory(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return None


Say = Callable[..., None]


def settle(cfg: TrainConfig, device: torch.device, say: Optional[Say] = None):
    """Before loading: print the plan beside the free memory — the DiT's, and the planner LM's when the run trains
    it (with the DiT: the joint peak); with ``memory auto`` / ``offload_layers auto`` pick the smallest change of the
    DiT's settings that fits (beside the LM); refuse (ValueError) when the settings cannot fit. Returns a
    ``Holding`` (None for ``train_models lm``: no DiT is loaded)."""
    from . import Holding
    from .plan_lm import plan_for_run  # it imports this module

    device = torch.device(device)
    free = free_memory(device)
    auto_off = cfg.offload_layers == "auto"
    try:
        lm = plan_for_run(cfg, CONDITION_TOKENS) if cfg.trains_lm else None
        if not cfg.trains_dit:
            return _settle_lm_only(lm, device, free, say)
        config = checkpoint_config(cfg.checkpoint)
        frames, cond_tokens = dataset_shape(cfg)
        shape = {"frames": frames, "cond_tokens": cond_tokens}
        plan = _plan_for(config, cfg, device, free, auto_off, lm, shape)
    except ValueError:
        raise
    except Exception as exc:  # the estimate must never be what stops a run that could train
        if say:
            say(f"memory plan: not available ({type(exc).__name__}: {exc})", logging.WARNING)
        return Holding(cfg.base_precision, 0 if auto_off else int(cfg.offload_layers)) if cfg.trains_dit else None
    if say:
        say("memory plan: " + plan.describe())
    if plan.fits is False:
        better = smallest_fit(config, cfg, free, str(device), lm=lm, **shape)
        if better:
            hint = f"smallest change that fits: {better.describe()} (use --memory auto to pick it)"
        elif lm is not None:
            hint = ("no base precision / offload of the DiT fits beside the planner LM; " + LM_CHANGES
                    + ", lower crop_seconds or rank, or train the LM in its own run (train_models lm)")
        else:
            hint = "no base precision / offload fits; lower crop_seconds, batch_size or rank"
        share = f" (the planner LM's share: {plan.lm_share / GIB:.2f} GiB)" if lm is not None else ""
        raise ValueError(f"memory: these settings need about {plan.needed / GIB:.2f} GiB{share} but {device} has "
                         f"{free / GIB:.2f} GiB free — {hint}")
    return Holding(plan.base_precision, plan.offload_layers, plan, fused_backward=plan.fused_backward)


LM_CHANGES = "lower batch_size or lm_rank, or shorten the longest song (the planner LM trains on whole songs)"


def _settle_lm_only(lm: LMMemoryPlan, device: torch.device, free: Optional[int], say: Optional[Say]) -> None:
    """``train_models lm``: the planner LM alone against the free memory."""
    from .plan_lm import lm_needed

    needed = lm_needed(lm, str(device))
    if say:
        say(f"memory plan: {lm.describe()}; needed {size(needed)}"
            + (f"; {device} has {size(free)} free" if free is not None else ""))
    if free is not None and needed > free:
        raise ValueError(f"memory: training the planner LM needs about {needed / GIB:.2f} GiB (weights "
                         f"{size(lm.weights)}, LoRA+optimizer {size(lm.adapter)}, step {size(lm.step)}) but {device} "
                         f"has {free / GIB:.2f} GiB free — {LM_CHANGES}")


def _plan_for(config: AceStepConfig, cfg: TrainConfig, device: torch.device, free: Optional[int],
              auto_off: bool, lm: Optional[LMMemoryPlan], shape: dict) -> MemoryPlan:
    """``shape``: the dataset's largest micro-batch (``dataset_shape``), for every plan made here."""
    if cfg.memory == "auto" and free is not None:
        plan = smallest_fit(config, cfg, free, str(device), start=cfg.base_precision, lm=lm, **shape)
        if plan is None:
            smallest = dataclasses.replace(_smallest(config, cfg, device, shape), lm=lm)
            beside = f" beside the planner LM ({LM_CHANGES})" if lm is not None else ""
            raise ValueError(f"memory auto: nothing fits in {free / GIB:.2f} GiB free on {device}{beside} "
                             f"(smallest: {smallest.describe()}); lower crop_seconds or rank")
    elif auto_off and free is not None:
        cache: dict = {}
        plan = None
        for n in range(config.num_hidden_layers + 1):
            plan = estimate_cached(config, cfg, cfg.base_precision, n, str(device), cache, **shape)
            plan.free, plan.lm = free, lm
            if plan.fits:
                break
    else:
        plan = estimate(config, cfg, offload_layers=0 if auto_off else None, device=str(device), **shape)
        plan.free, plan.lm = free, lm
    return plan


def dataset_shape(cfg: TrainConfig) -> tuple[Optional[int], int]:
    """(frames, condition tokens) of the largest micro-batch the dataset can make: the crop, or the longest clip when
    shorter or not cropping, beside the longest condition (a batch is padded to both). Without a dataset: the
    crop's frames (``None``: ``estimate`` decides) and ``CONDITION_TOKENS``."""
    from ..training.data import FRAMES_PER_SECOND, open_dataset

    if not cfg.dataset:
        return None, CONDITION_TOKENS
    clips = open_dataset(cfg.dataset).clips
    longest = max(c.frames for c in clips)
    crop = int(round(cfg.crop_seconds * FRAMES_PER_SECOND))
    return (min(longest, crop) if crop else longest), max(c.cond_len for c in clips)


def _smallest(config, cfg, device, shape: dict) -> MemoryPlan:
    return estimate(config, cfg.replace(fused_backward=cfg.fused_backward or can_fuse(cfg)), base_precision="nf4",
                    offload_layers=config.num_hidden_layers, device=str(device), **shape)
