"""Tensor interchange for keysel's Python functions: inputs handed to keysel._C without copies, outputs made
in the caller's own library, CUDA streams, and keysel.Error messages in the Python keywords' names.

Rules (docs/python.md):
- Inputs: NumPy arrays and any DLPack producer (torch, CuPy, JAX), CPU or CUDA, read in place. torch tensors
  are detached (no copy); torch float8 tensors cross as their bytes (``view(torch.uint8)``) with the format
  named, as uint8 arrays with ``dtype="fp8_e4m3"`` / ``"fp8_e5m2"`` do.
- Outputs: torch tensors when any tensor argument is a torch tensor, CuPy arrays when any is a CuPy array (and
  none is torch), NumPy arrays otherwise; on the device of the call's first tensor argument. ``out=`` is
  written in place instead.
- Streams: ``stream=`` an int (a cudaStream_t) or an object with ``cuda_stream`` / ``ptr`` (torch, CuPy
  streams); by default torch's current stream when torch tensors are passed, CuPy's current stream for CuPy
  arrays, else the legacy default stream (0).
"""

from __future__ import annotations

import re
import sys

import numpy as np

from . import _C

Error = _C.Error

_FP8_NAMES = {"float8_e4m3fn": "fp8_e4m3", "float8_e5m2": "fp8_e5m2"}


def _torch():
    """The torch module when the caller has imported it (keysel never imports torch itself)."""
    return sys.modules.get("torch")


def is_torch(x) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def is_cupy(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def fail(function: str, argument: str, expected: str, got) -> Error:
    return Error(f"keysel.{function}: argument '{argument}': expected {expected}, got {got}")


def arg(x, function: str, argument: str, dtype: str | None = None):
    """(object for _C, keysel dtype override or "") for one tensor argument."""
    if x is None:
        raise fail(function, argument, "a tensor", "None")
    if is_torch(x):
        x = x.detach()
        name = str(x.dtype).removeprefix("torch.")
        if name in _FP8_NAMES:
            if dtype is not None and dtype != _FP8_NAMES[name]:
                raise fail(function, "dtype", f"None or \"{_FP8_NAMES[name]}\" for a torch.{name} tensor", repr(dtype))
            return x.view(_torch().uint8), _FP8_NAMES[name]
        return x, dtype or ""
    if isinstance(x, np.ndarray) or hasattr(x, "__dlpack__") or hasattr(x, "__array_interface__"):
        return x, dtype or ""
    raise fail(function, argument, "a NumPy array or a DLPack tensor (torch, CuPy, JAX)", type(x).__name__)


def workspace(x, function: str):
    """A caller's scratch memory as the int8 bytes _C takes (None stays None); a contiguous tensor of any dtype."""
    if x is None:
        return None
    if is_torch(x):
        if not x.is_contiguous():
            raise fail(function, "workspace", "a contiguous tensor", f"strides {list(x.stride())}")
        return x.detach().view(-1).view(_torch().int8)
    if isinstance(x, np.ndarray):
        if not x.flags.c_contiguous:
            raise fail(function, "workspace", "a contiguous array", f"strides {list(x.strides)}")
        return x.reshape(-1).view(np.int8)
    if is_cupy(x):
        import cupy

        if not x.flags.c_contiguous:
            raise fail(function, "workspace", "a contiguous array", f"strides {list(x.strides)}")
        return x.ravel().view(cupy.int8)
    raise fail(function, "workspace", "a torch tensor or a CuPy/NumPy array", type(x).__name__)


def _dlpack_shape(x):
    """The shape of a DLPack producer that has no .shape attribute (the protocol requires only __dlpack__ and
    __dlpack_device__), read from a zero-copy view: NumPy's on the CPU, torch's on a GPU; None if neither can."""
    if not hasattr(x, "__dlpack__"):
        return None
    try:
        if device_of(x)[0] == "cpu":
            return tuple(np.from_dlpack(x).shape)
        return tuple(_torch().from_dlpack(x).shape)
    except Exception:  # noqa: BLE001 - an unreadable producer is reported as the argument's error
        return None


def shape(x, function: str, argument: str, rank: int, layout: str) -> tuple:
    """The shape of a tensor argument after checking its rank (keysel.Error naming the argument otherwise)."""
    s = tuple(int(n) for n in x.shape) if hasattr(x, "shape") else _dlpack_shape(x)
    if s is None or len(s) != rank:
        got = f"shape {list(s)}" if s is not None else type(x).__name__
        raise fail(function, argument, f"a rank-{rank} tensor {layout}", got)
    return s


def device_of(x):
    """("cpu", 0) or ("cuda", index) of a tensor argument."""
    if is_torch(x):
        return (x.device.type, x.device.index or 0) if x.device.type == "cuda" else ("cpu", 0)
    if is_cupy(x):
        return ("cuda", int(x.device.id))
    if hasattr(x, "__dlpack_device__"):
        kind, index = x.__dlpack_device__()
        return ("cuda", int(index)) if int(kind) in (2, 13) else ("cpu", 0)
    return ("cpu", 0)


_TORCH_DTYPES = {"float32": "float32", "float64": "float64", "int32": "int32"}


def empty(shape, dtype: str, inputs, function: str, fill=None):
    """An output tensor in the inputs' library, on the device of inputs[0] (see the module docstring)."""
    first = inputs[0]
    kind, index = device_of(first)
    if any(is_torch(x) for x in inputs):
        torch = _torch()
        if kind == "cuda" and torch.cuda.is_current_stream_capturing():
            raise fail(function, "out", "an output tensor while a CUDA graph is captured (keysel allocates nothing "
                       "during capture)", "None")
        device = torch.device("cuda", index) if kind == "cuda" else torch.device("cpu")
        out = torch.empty(shape, dtype=getattr(torch, _TORCH_DTYPES[dtype]), device=device)
    elif any(is_cupy(x) for x in inputs):
        import cupy

        with cupy.cuda.Device(index):
            out = cupy.empty(shape, dtype=dtype)
    elif kind == "cuda":
        raise fail(function, "out", "an output tensor for CUDA inputs that are neither torch nor CuPy", "None")
    else:
        out = np.empty(shape, dtype=dtype)
    if fill is not None:
        out[...] = fill
    return out


def stream_handle(stream, inputs) -> int:
    """The cudaStream_t a CUDA call runs on, as an int (0: the legacy default stream)."""
    if stream is None:
        first = inputs[0]
        if device_of(first)[0] != "cuda":
            return 0
        if is_torch(first):
            torch = _torch()
            raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # a plain int, without a Stream object
            if raw is not None:
                return int(raw(first.device.index if first.device.index is not None else torch.cuda.current_device()))
            return int(torch.cuda.current_stream(first.device).cuda_stream)
        if is_cupy(first):
            import cupy

            return int(cupy.cuda.get_current_stream().ptr)
        return 0
    if isinstance(stream, int):
        return stream
    for attribute in ("cuda_stream", "ptr", "handle"):
        if hasattr(stream, attribute):
            return int(getattr(stream, attribute))
    raise Error(f"keysel: argument 'stream': expected an int (cudaStream_t) or a torch/CuPy stream, got "
                f"{type(stream).__name__}")


def _capsules(args):
    """args with every torch tensor replaced by its DLPack capsule. nanobind would otherwise call Tensor.__dlpack__,
    a Python method that costs several microseconds per tensor (on a GPU it also records an event to order the
    legacy default stream after the current one, which keysel, running on the caller's stream, does not need)."""
    torch = _torch()
    if torch is None:
        return args
    to_dlpack = torch.utils.dlpack.to_dlpack
    return tuple(to_dlpack(x) if isinstance(x, torch.Tensor) and not x.requires_grad and x.layout == torch.strided
                 and not x.is_conj() and not x.is_neg() else x for x in args)


def call(function: str, renames: dict, body, *args):
    """Runs body(*args), re-raising keysel.Error with the C++ argument names replaced by the Python ones."""
    try:
        return body(*_capsules(args))
    except Error as error:
        message = str(error)
        for cpp, py in renames.items():
            message = message.replace(f"argument '{cpp}'", f"argument '{py}'")
        message = re.sub(r"^keysel::([A-Za-z_.:]+):", lambda m: f"keysel.{function}:", message, count=1)
        raise Error(message) from None


# C++ argument names -> Python keywords, per kind of call.
POLICY = {"policy.k": "k", "policy.n_sink": "n_sink", "policy.n_local": "n_local",
          "policy.n_sink + policy.n_local": "n_sink + n_local"}
GROUPS = {"kv_heads": "k_cache", "query_heads": "q"}
ATTENTION = {"k": "k_cache", "v": "v_cache", "cache.k": "k_cache", "cache.v": "v_cache",
             "cache.block_table": "block_table", **POLICY}
