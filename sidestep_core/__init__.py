"""Side-Step core: headless ACE-Step 1.5 adapter training (no ComfyUI imports here)."""

import logging as _logging

__version__ = "0.1.0"

# a log record's flag (``extra``): its message also went to the progress callback, which shows it
LOG_SHOWN = "sidestep_shown"


def _drop_bitsandbytes_kernel_notice(record: _logging.LogRecord) -> bool:
    # bitsandbytes warns on every import (peft imports it) that an optional CPU 4-bit kernel package is missing;
    # we never use 4-bit CPU kernels. Only that one message is dropped; the logger's other records pass.
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_bitsandbytes_kernel_notice)
