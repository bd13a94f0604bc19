"""Verify-step kernels: the fused Triton kernel, its eager reference and the backend switch."""

from __future__ import annotations

from collections.abc import Callable

import torch

from autojudge.errors import AutojudgeError
from autojudge.kernels.common import VerifyOutput
from autojudge.kernels.reference import verify_reference
from autojudge.kernels.triton_verify import INTERPRET_HINT, interpreted, verify

__all__ = ["VerifyOutput", "resolve_kernels", "verify", "verify_reference"]


def resolve_kernels(name: str, device) -> Callable[..., VerifyOutput]:
    """Verify implementation for ``--kernels {triton,eager,auto}`` on ``device``.

    "auto" picks Triton on CUDA, or on CPU when the interpreter is active, else eager.
    """
    device = torch.device(device)
    triton_ok = device.type == "cuda" or (device.type == "cpu" and interpreted())
    if name == "eager":
        return verify_reference
    if name == "auto":
        return verify if triton_ok else verify_reference
    if name == "triton":
        if not triton_ok:
            raise AutojudgeError(f"--kernels triton cannot run on {device}: {INTERPRET_HINT}")
        return verify
    raise AutojudgeError(f"unknown kernels {name!r}: choose triton, eager or auto")
