"""Where the local models run: ``auto`` device and dtype resolved to torch's."""

from __future__ import annotations

import torch

from proxyclient.errors import ConfigError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if str(device) != "auto":
        try:
            return torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"device {device!r} is not a torch device ({exc})") from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on cuda, fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ConfigError(f"dtype must be auto or one of {', '.join(names)}, got {dtype!r}")
    return names[dtype]
