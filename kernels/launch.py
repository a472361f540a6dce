"""Programmatic dependent launch (PDL): on Hopper and later, the next kernel is launched while this one finishes.

A decoding step of the embedded model is a chain of about 160 kernels of a few microseconds each, replayed from
one CUDA graph. Between two of them the GPU waits for the next grid to be launched and its programs to start:
on the H200, a default-tree verify replays in 236.9 us of which its 62 kernels run 198.7
(`data/results/profile_rope_rows_h200.json`), about 0.6 us lost at every kernel boundary.

PDL (CUDA 12, compute capability 9.0+) lets a kernel launched with the programmatic-serialization attribute start
as soon as every program of the kernel before it has executed `griddepcontrol.launch_dependents`. The early kernel
must then execute `griddepcontrol.wait`, which returns once the kernel before it has finished and its writes are
visible, before it reads or writes anything another kernel touches. CUDA graphs keep these edges.

Every kernel of this package opens with the same two instructions, in this order and in every program, before any
other memory access or early return (search for `USE_PDL`):

    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # the kernel before this one has finished; its writes are visible
        tl.extra.cuda.gdc_launch_dependents()  # the kernel after this one may start (and wait in turn)

Waiting first keeps a chain safe: a kernel lets its successor start only after its own predecessor has finished,
so whatever was written two kernels back is complete as well. Inductor's generated kernels follow the same rule
when `torch._inductor.config.triton.enable_pdl` is set, which the decoder sets for the stages it compiles
(`inductor_options`). Kernels launched without the attribute (cuBLAS, PyTorch's own) wait for everything before
them as usual.

    LONGSPEC_PDL=auto   (default) PDL on CUDA devices of compute capability 9.0 or more whose Triton offers it
                        (`gdc_wait` and the `launch_pdl` option: 3.4 and later), never in the interpreter
    LONGSPEC_PDL=off    plain launches everywhere (the A/B side)

`launch_args(device)` gives the keyword arguments each launch site adds: the kernel's USE_PDL constexpr and Triton's
`launch_pdl` option, always together (a kernel launched early that does not wait would race).

Taught in: notebooks/07_timing_real_gpu_runs.ipynb (the PDL A/B pair)
"""

from __future__ import annotations

import os

import torch

PDL = os.environ.get("LONGSPEC_PDL", "auto")
_CHOICES = ("auto", "off")
_CAPABLE: dict = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_has_pdl() -> bool:
    """Whether the installed Triton can compile the gate (`tl.extra.cuda.gdc_wait`) and launch with PDL (the
    `launch_pdl` option of its CUDA backend). Older releases (the package allows torch 2.4's Triton) have neither,
    and the kernels then launch plainly."""
    if "triton" not in _CAPABLE:
        try:
            import triton.language.extra.cuda as cuda_ext
            from triton.backends.nvidia.compiler import CUDAOptions
        except ImportError:
            _CAPABLE["triton"] = False
        else:
            fields = getattr(CUDAOptions, "__dataclass_fields__", {})
            _CAPABLE["triton"] = hasattr(cuda_ext, "gdc_wait") and "launch_pdl" in fields
    return _CAPABLE["triton"]


def pdl_enabled(device) -> bool:
    """True when a launch on `device` uses PDL: LONGSPEC_PDL is auto, the device is CUDA with compute capability
    9.0 or more, Triton offers PDL and is not interpreting. Raises for an unknown LONGSPEC_PDL value."""
    if PDL not in _CHOICES:
        raise ValueError(f"LONGSPEC_PDL={PDL!r} is not one of {', '.join(_CHOICES)}; unset it or pick one")
    device = torch.device(device)
    if PDL == "off" or device.type != "cuda" or _interpreting() or not triton_has_pdl():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABLE:
        _CAPABLE[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _CAPABLE[index]


def launch_args(device) -> dict:
    """Keyword arguments for a launch of one of this package's kernels on `device`: USE_PDL (the kernel's
    constexpr: wait, then let the next kernel start) and launch_pdl (Triton's launch attribute), equal."""
    on = pdl_enabled(device)
    return {"USE_PDL": on, "launch_pdl": on}


def inductor_options(device) -> dict:
    """Inductor config entries for stages compiled to run on `device`: its generated kernels use PDL too when ours
    do (`triton.enable_pdl`, present in the PyTorch releases that generate PDL code); empty otherwise."""
    import torch._inductor.config as inductor_config

    if not pdl_enabled(device) or not hasattr(inductor_config.triton, "enable_pdl"):
        return {}
    return {"triton.enable_pdl": True}
