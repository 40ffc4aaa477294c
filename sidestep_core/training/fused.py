"""The optimizer step fused into backward (``fused_backward``): each adapter tensor is updated as soon as its gradient
is complete, and the gradient is freed, so only the gradients of the layer backward is in are alive instead of all
of them (kohya's ``--fused_backward_pass``, OneTrainer's "fused back pass").

A ``Tensor.register_post_accumulate_grad_hook`` on every trainable tensor calls the run's one optimizer's ``step()``
while that tensor is the only one holding a gradient: every optimizer of the pack skips tensors without one, so the
update is exactly the one the tensor gets in a normal step (same state, same learning rate and weight decay), and the
optimizer's state and checkpoints are the normal ones. What cannot be the same:

- gradient clipping is per tensor (each tensor's gradient is clipped to ``max_grad_norm`` on its own, as kohya's
  fused pass does): the global norm is known only after every tensor has been updated. Where the global norm is
  under ``max_grad_norm`` nothing is clipped either way and the steps are equal;
- Prodigy is refused (its step size comes from sums over all tensors), as are gradient accumulation, fp16 loss
  scaling, several processes and training the planner LM (``TrainConfig.fused_backward_refusal``).
"""

from __future__ import annotations

from typing import Optional

import torch


class FusedBackward:
    """Hooks on ``params``: in ``step`` mode each gradient is clipped (per tensor), added to the step's squared
    norm (on the device, no synchronisation) and applied by ``optimizer``; then it is freed. In ``discard`` mode
    gradients are only freed (the warm-up passes that measure time and memory, and the memory plan's fake step)."""

    def __init__(self, params: list[torch.nn.Parameter], optimizer: Optional[torch.optim.Optimizer],
                 max_grad_norm: float = 0.0):
        self.optimizer = optimizer
        self.max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
        self.mode = "step" if optimizer is not None else "discard"
        self._sq: Optional[torch.Tensor] = None
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def _hook(self, p: torch.Tensor) -> None:
        if self.mode == "step":
            norm = torch.nn.utils.clip_grad_norm_([p], self.max_norm).float().square()
            self._sq = norm if self._sq is None else self._sq + norm
            self.optimizer.step()
        p.grad = None

    def take_norm(self) -> torch.Tensor:
        """The global norm of this step's gradients (before clipping), as a device tensor; resets the sum."""
        sq, self._sq = self._sq, None
        return torch.zeros(()) if sq is None else sq.sqrt()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
