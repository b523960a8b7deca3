"""IndexerKeyCache(device="cuda"): the indexer key cache in GPU memory, in the engines' paged fp8 layout (SPEC §7),
scored and selected by keysel's CUDA indexer (indexer_logits_cuda / indexer_topk_cuda).

Storage is the CPU cache's fp8_e4m3 per-token format with the same quantisation rule (scale = max(amax / 448,
FLT_MIN), 1 for an all-zero key, rounded up to a power of two with power_of_two_scales), so a key's codes and scale
are those the CPU cache stores; only the layout differs (pages of 64 tokens: 64 x DI fp8 bytes, then 64 float32
scales). Queries are quantised per (token, head) by the same rule and the scale folded into the head weight, as the
engines do. torch only; nothing synchronises the host except growing the page buffer in append().
"""

from __future__ import annotations

from ._interop import fail

PAGE = 64
FLT_MIN = 1.1754943508222875e-38
FP8_MAX = 448.0


def _torch():
    import torch

    return torch


def quantise(x, power_of_two):
    """float [..., D] -> (fp8 e4m3 codes [..., D], float32 scales [...]), keysel's per-row rule (SPEC §3)."""
    torch = _torch()
    x = x.to(torch.float32)
    amax = x.abs().amax(dim=-1)
    scale = torch.clamp(amax / torch.full_like(amax, FP8_MAX), min=FLT_MIN)
    if power_of_two:
        mantissa, exponent = torch.frexp(scale)
        scale = torch.where(mantissa == 0.5, scale, torch.ldexp(torch.ones_like(scale), exponent))
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(x / scale.unsqueeze(-1), -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale


class CudaKeyCache:
    def __init__(self, fn, dim, format, scale, power_of_two_scales, hadamard, device):
        torch = _torch()
        if format != "fp8_e4m3" or scale != "per_token":
            raise fail(fn, "format", "fp8_e4m3 with scale=\"per_token\" on a GPU (the engines' layout)",
                       f"{format!r}, scale={scale!r}")
        if dim not in (64, 128):
            raise fail(fn, "dim", "64 or 128 on a GPU (keysel's CUDA indexer)", dim)
        if hadamard:
            raise fail(fn, "hadamard", "False on a GPU (rotate keys and queries before handing them in)", hadamard)
        from . import built_with_cuda

        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise fail(fn, "device", "\"cpu\" or a CUDA device", repr(device)) from None
        if self.device.type != "cuda":
            raise fail(fn, "device", "\"cpu\" or a CUDA device", repr(device))
        if not built_with_cuda() or not torch.cuda.is_available():
            raise fail(fn, "device", "a CUDA device present and a CUDA build of keysel", repr(device))
        if self.device.index is None:  # "cuda": the current GPU, named by index so tensors compare equal
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dim = dim
        self.power_of_two = bool(power_of_two_scales)
        self.size = 0
        self.pages = torch.zeros((0, PAGE * (dim + 4)), dtype=torch.uint8, device=self.device)

    @property
    def config(self):
        return "fp8_e4m3" + ("/ue8m0" if self.power_of_two else "")

    def append(self, fn, keys):
        torch = _torch()
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or keys.shape[1] != self.dim:
            raise fail(fn, "keys", f"a torch tensor [n, {self.dim}]", getattr(keys, "shape", type(keys).__name__))
        if keys.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise fail(fn, "keys", "float32, float16 or bfloat16", keys.dtype)
        keys = keys.to(self.device)
        if not bool(torch.isfinite(keys).all()):
            raise fail(fn, "keys", "finite values", "a NaN or an infinity")
        n = keys.shape[0]
        needed = -(-(self.size + n) // PAGE)
        if needed > self.pages.shape[0]:
            grown = max(needed, 2 * self.pages.shape[0])
            extra = torch.zeros((grown - self.pages.shape[0], self.pages.shape[1]), dtype=torch.uint8,
                                device=self.device)
            self.pages = torch.cat([self.pages, extra])
        codes, scales = quantise(keys, self.power_of_two)
        slots = torch.arange(self.size, self.size + n, device=self.device)
        page, row = slots // PAGE, slots % PAGE
        values = self.pages[:, : PAGE * self.dim].view(-1, PAGE, self.dim)
        values[page, row] = codes.view(torch.uint8)
        scale_bytes = self.pages[:, PAGE * self.dim:].view(-1, PAGE, 4)
        scale_bytes[page, row] = scales.view(torch.uint8).view(n, 4)
        self.size += n

    def clear(self):
        self.size = 0

    def _queries(self, fn, q_index, weights, positions):
        torch = _torch()
        for name, x in (("q_index", q_index), ("weights", weights), ("positions", positions)):
            if not isinstance(x, torch.Tensor) or x.device != self.device:
                raise fail(fn, name, f"a torch tensor on {self.device}", getattr(x, "device", type(x).__name__))
        if q_index.dim() != 3 or q_index.shape[2] != self.dim:
            raise fail(fn, "q_index", f"[T, HI, {self.dim}]", list(q_index.shape))
        codes, scales = quantise(q_index, self.power_of_two)  # [T, HI], per (token, head)
        folded = (weights.to(torch.float32) * scales).contiguous()
        rows = torch.zeros(q_index.shape[0], dtype=torch.int32, device=self.device)
        return codes.contiguous(), folded, rows

    def scores(self, fn, q_index, weights, positions, out):
        from . import indexer_logits_cuda

        codes, folded, rows = self._queries(fn, q_index, weights, positions)
        return indexer_logits_cuda(codes, folded, self.pages, positions, self.size, sequence_of_row=rows, out=out)

    def select(self, fn, q_index, weights, positions, k, n_sink, n_local, kept_on_top, out):
        from . import indexer_topk_cuda

        codes, folded, rows = self._queries(fn, q_index, weights, positions)
        return indexer_topk_cuda(codes, folded, self.pages, positions, self.size, k, n_sink=n_sink, n_local=n_local,
                                 kept_on_top=kept_on_top, sequence_of_row=rows, out=out)
