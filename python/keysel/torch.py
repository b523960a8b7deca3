"""Top-k attention for PyTorch models: attention that reads only the keys a selector picks.

    import keysel.torch as kt
    out = kt.topk_attention(query, key, value, k=64)                 # layout of F.scaled_dot_product_attention

    kt.configure(k=64, granularity="per_kv_head")                    # registers attn_implementation="keysel_topk"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="keysel_topk")

Layout (as torch.nn.functional.scaled_dot_product_attention): query [B, Hq, T, D], key [B, Hkv, N, D], value
[B, Hkv, N, Dv], Hkv dividing Hq (GQA by head count); output [B, Hq, T, Dv] in query's dtype. With is_causal the
T queries sit at the last T of the N key positions (prefill T = N, decoding T = 1 after N - 1 cached keys): query
t reads keys s <= N - T + t. Without it every query reads all N keys.

Each query token and selection group (docs/SPEC.md §2: granularity "per_head", "per_kv_head" or "per_token")
reads k keys: the exact top-k of the group's mean attention probabilities (selector="exact"), or the keys of any
selector keysel.make_selector builds from a spec (a dict or JSON text; docs/studies.md), or of a Python callable.
Sinks (n_sink) and a local window (n_local) are always kept and count toward k. Attention is then softmax
renormalised over the selected keys (keysel.sparse_attention).

The selection and the attention are torch.library custom ops (torch >= 2.4): torch.ops.keysel.topk_select,
torch.ops.keysel.exact_topk, torch.ops.keysel.exact_topk_from (padding before a start key) and
torch.ops.keysel.sparse_attention, with fake implementations, so torch.compile
(fullgraph) traces through topk_attention with selector="exact", and CUDA graphs can capture it. They run keysel's
compiled core (keysel._C) when it is importable and takes the tensors' device, and pure-torch stand-ins that
follow the same contract otherwise (keysel.torch.backend() says which; configure(backend=...) forces one).

Statistics: pass stats=TopkStats() (or configure(stats=...)) and every call records the SPEC §4 metrics of its
selection against the exact top-k (keysel.metrics), per layer. Recording runs eagerly (not under torch.compile).
"""
import contextlib
import json
import math
import threading
from typing import Optional

import torch

from . import _torch_fallback as _fallback

__all__ = [
    "topk_attention",
    "TopkStats",
    "configure",
    "options",
    "settings",
    "register_transformers",
    "transformers_attention",
    "backend",
    "ops_registered",
    "exact_topk",
    "exact_topk_from",
    "topk_select",
    "sparse_attention",
    "sparse_mla",
    "indexer_kl_loss",
]

GRANULARITIES = _fallback.GRANULARITIES
ATTN_IMPLEMENTATION = "keysel_topk"

_TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2] if x.isdigit())



def _is_compiling():
    """Whether torch.compile is tracing the caller (False on a torch without torch.compiler.is_compiling)."""
    probe = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(probe()) if probe is not None else False


# ----------------------------------------------------------------------------------------------- the core


_core_module = None
_core_checked = False


def _core():
    """keysel (the compiled core's Python API) or None when keysel._C cannot be imported."""
    global _core_module, _core_checked
    if not _core_checked:
        _core_checked = True
        try:
            import keysel._C  # noqa: F401
            import keysel as core
            _core_module = core if hasattr(core, "select_topk") else None
        except ImportError:
            _core_module = None
    return _core_module


def _core_takes(device, dtype=torch.float32):
    """Whether the compiled core runs the selection ops (and the attention of non-CUDA tensors) on tensors of
    `device`: on the CPU. keysel's exact top-k runs on the CPU only, so CUDA tensors take the pure-torch selection,
    which stays on the GPU; attention over CUDA tensors is decided by _cuda_kernels_take instead."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.float16, torch.bfloat16)
            and _settings["backend"] != "torch" and _core() is not None)


def backend(device="cpu"):
    """"keysel" when the compiled core runs the selection ops on `device`, "torch" when the pure-torch stand-ins
    do (sparse_attention on bfloat16/float32 CUDA tensors runs keysel's CUDA kernels either way)."""
    return "keysel" if _core_takes(torch.device(device)) else "torch"


def _use_core(*tensors):
    """Whether an op runs the compiled core on these tensors: never with backend "torch"; where it can with
    "auto"; with "keysel" where it can, and a ValueError (or ImportError without keysel._C) elsewhere."""
    choice = _settings["backend"]
    if choice == "torch":
        return False
    able = all(_core_takes(x.device, x.dtype) for x in tensors)
    if choice == "keysel" and not able:
        if _core() is None:
            raise ImportError("keysel.torch: backend='keysel' asks for the compiled core, but keysel._C cannot be "
                              "imported (build the package: pip install . or see docs/python.md)")
        got = ", ".join(f"{x.dtype} on {x.device}" for x in tensors)
        raise ValueError(f"keysel.torch: backend='keysel' runs the compiled core on CPU tensors of float32, "
                         f"float16 or bfloat16; got {got} (use backend='auto' or 'torch')")
    return able


# ----------------------------------------------------------------------------------------------- the ops
#
# Single-sequence tensors, keysel's own layout: q [T, Hq, D], k_cache [N, Hkv, D], v_cache [N, Hkv, Dv],
# positions int32 [T], selections int32 [T, G, W].


def _as_float(x):
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _topk_select_impl(scores, positions, k, n_sink, n_local, kept_on_top):
    if _use_core(scores):
        return _core().select_topk(_as_float(scores).contiguous(), positions.to(torch.int32).contiguous(), k,
                                   n_sink=n_sink, n_local=n_local, kept_on_top=kept_on_top)
    return _fallback.select_topk(scores, positions, k, n_sink, n_local, kept_on_top)


def _exact_topk_impl(q, k_cache, positions, k, granularity, scale, n_sink, n_local):
    if _use_core(q, k_cache):
        return _core().exact_topk(q.contiguous(), k_cache.contiguous(),
                                  positions.to(torch.int32).contiguous(), k, granularity=granularity, scale=scale,
                                  n_sink=n_sink, n_local=n_local)
    return _fallback.exact_topk(q, k_cache, positions, k, granularity, scale, n_sink, n_local)


def _exact_topk_from_impl(q, k_cache, positions, key_start, k, granularity, scale, n_sink, n_local):
    # Keys before key_start are padding: select among [key_start, N) (sinks are its first keys), then shift back.
    # Reading the start here, inside the op, keeps the data-dependent slice out of traced graphs.
    if not _use_core(q, k_cache):  # the pure-torch path masks the padding keys: no host synchronisation
        return _fallback.exact_topk(q, k_cache, positions, k, granularity, scale, n_sink, n_local, key_start)
    first = int(key_start)
    selection = _exact_topk_impl(q, k_cache[first:], (positions.to(torch.int64) - first).to(torch.int32), k,
                                 granularity, scale, n_sink, n_local)
    return torch.where(selection >= 0, selection + first, selection)


def _cuda_kernels_take(q, k_cache, v_cache, *more, forward=False):
    """Whether keysel's CUDA attention kernels run these CUDA tensors: a CUDA build, backend not "torch", one GPU,
    q, K, V (and `more`) all bfloat16 (or, for the backward only, all float32); the forward kernel also needs
    D == Dv in {64, 128, 256}, the backward D, Dv <= 256."""
    if _settings["backend"] == "torch" or q.device.type != "cuda" or _core() is None:
        return False
    if not _core().built_with_cuda():
        return False
    tensors = (q, k_cache, v_cache) + more
    if any(x.device != q.device for x in tensors):
        return False
    dtypes = {x.dtype for x in tensors}
    d, dv = k_cache.shape[-1], v_cache.shape[-1]
    if forward:
        return dtypes == {torch.bfloat16} and d == dv and d in (64, 128, 256)
    return len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float32} and d <= 256 and dv <= 256


# The tiled prefill forward (keysel.sparse_attention_prefill) serves CUDA calls of at least this many query tokens
# whose shape it takes; shorter ones run the decode kernel, which splits each row's keys across thread blocks (a
# tile holds 64 / g tokens, so a few tokens leave most of a tile's rows and of the GPU idle). A first choice, to be
# revisited with GPU timings.
TILED_MIN_TOKENS = 64


def _tiled_forward_takes(q, k_cache, v_cache, selection, granularity):
    """Whether keysel's tiled CUDA forward runs these CUDA tensors: a CUDA build, backend not "torch", at least
    TILED_MIN_TOKENS query tokens, all bfloat16 on one GPU, and a shape keysel.sparse_attention_prefill takes
    (D, Dv of 64 or 128, Hq / Hkv dividing 64, per_kv_head or per_token, the GPU's shared memory)."""
    if _settings["backend"] == "torch" or q.device.type != "cuda" or _core() is None:
        return False
    if q.dim() != 3 or q.shape[0] < TILED_MIN_TOKENS or not _core().built_with_cuda():
        return False
    if any(x.device != q.device or x.dtype != torch.bfloat16 for x in (k_cache, v_cache)) or q.dtype != torch.bfloat16:
        return False
    return _core().sparse_attention_prefill_supported(q.contiguous(), k_cache.contiguous(), v_cache.contiguous(),
                                                      selection, granularity=granularity)


def _sparse_attention_prefill_cuda(q, k_cache, v_cache, selection, granularity, scale):
    out = torch.empty((q.shape[0], q.shape[1], v_cache.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], q.shape[1]), dtype=torch.float32, device=q.device)
    _core().sparse_attention_prefill(q.contiguous(), k_cache.contiguous(), v_cache.contiguous(), selection,
                                     granularity=granularity, scale=scale, out=out, lse=lse)
    return out, lse


def _sparse_attention_cuda(q, k_cache, v_cache, selection, granularity, scale):
    # keysel's CUDA kernel serves a batch of rows over a paged cache: one sequence's [N, Hkv, D] cache is one page
    # of N tokens that every query row's one-entry block table names.
    t = q.shape[0]
    table = torch.zeros((t, 1), dtype=torch.int32, device=q.device)
    out = torch.empty((t, q.shape[1], v_cache.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((t, q.shape[1]), dtype=torch.float32, device=q.device)
    _core().sparse_attention(q.contiguous(), k_cache.contiguous().unsqueeze(0), v_cache.contiguous().unsqueeze(0),
                             selection.to(torch.int32).contiguous(), granularity=granularity, scale=scale,
                             block_table=table, out=out, lse=lse)
    return out, lse


def _sparse_attention_impl(q, k_cache, v_cache, selection, granularity, scale, deterministic=None):
    # `deterministic` is for the backward; both CUDA forwards are deterministic.
    if q.device.type == "cuda" and k_cache.shape[0] > 0:
        selection32 = selection.to(torch.int32).contiguous()
        if _tiled_forward_takes(q, k_cache, v_cache, selection32, granularity):
            return _sparse_attention_prefill_cuda(q, k_cache, v_cache, selection32, granularity, scale)
    if q.shape[0] > 0 and k_cache.shape[0] > 0 and _cuda_kernels_take(q, k_cache, v_cache, forward=True):
        return _sparse_attention_cuda(q, k_cache, v_cache, selection, granularity, scale)
    if _use_core(q, k_cache, v_cache):
        out, lse = _core().sparse_attention(q.contiguous(), k_cache.contiguous(), v_cache.contiguous(),
                                            selection.to(torch.int32).contiguous(), granularity=granularity,
                                            scale=scale)
        return out.to(q.dtype), lse.to(torch.float32)
    return _fallback.sparse_attention(q, k_cache, v_cache, selection, granularity, scale)


def _sparse_attention_backward_impl(q, k_cache, v_cache, selection, out, lse, grad_out, granularity, scale,
                                    grad_lse=None, deterministic=None):
    """(dq, dk, dv) of sparse_attention's out, and of its lse when grad_lse is given (SPEC §9), in the dtypes of q,
    k_cache, v_cache: keysel's CUDA kernel for CUDA tensors it takes (_cuda_kernels_take), keysel's CPU kernel
    where the compiled core takes the CPU tensors, the gather-based pure-torch backward otherwise (other CUDA
    tensors, float64, backend "torch"). On CUDA, deterministic=False lets keysel take its tiled kernel (atomics);
    None: deterministic exactly when torch.are_deterministic_algorithms_enabled(), read here, when the backward
    runs."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    cuda = _cuda_kernels_take(q, k_cache, v_cache, out, grad_out) and (grad_lse is None
                                                                       or grad_lse.device == q.device)
    if cuda or (q.device.type == "cpu" and _use_core(q, k_cache, v_cache)
                and grad_out.dtype in (torch.float32, torch.float16, torch.bfloat16)):
        dq, dk, dv = _core().sparse_attention_backward(
            q.contiguous(), k_cache.contiguous(), v_cache.contiguous(), selection.to(torch.int32).contiguous(),
            out.contiguous(), lse.to(torch.float32).contiguous(), grad_out.contiguous(), granularity=granularity,
            scale=scale, grad_lse=None if grad_lse is None else grad_lse.to(torch.float32).contiguous(),
            deterministic=bool(deterministic))
        return dq.to(q.dtype), dk.to(k_cache.dtype), dv.to(v_cache.dtype)
    return _fallback.sparse_attention_backward(q, k_cache, v_cache, selection, grad_out, granularity, scale,
                                               grad_lse)


def _attention_setup_context(ctx, inputs, output):
    q, k_cache, v_cache, selection, granularity, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k_cache, v_cache, selection, out, lse)
    ctx.granularity = granularity
    ctx.scale = scale
    ctx.deterministic = deterministic
    # An output the loss does not use arrives as None (not zeros): an unused lse adds no term and keeps CUDA
    # tensors on keysel's CUDA backward.
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, grad_out, grad_lse, backward):
    q, k_cache, v_cache, selection, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = backward(q, k_cache, v_cache, selection, out, lse, grad_out, ctx.granularity, ctx.scale, grad_lse,
                          ctx.deterministic)
    return dq, dk, dv, None, None, None, None


# Sparse MLA (SPEC §8, §9.2): q [T, H, 576], one latent cache kv [N, 576] (values: its first 512 channels),
# indices int32 [T, k] (-1 or out of range: invalid), topk_length int32 [T] or None, attn_sink [H] or None.


def _sparse_mla_impl(q, kv, indices, topk_length, attn_sink, scale):
    if _use_core(q, kv) and q.device.type == "cpu":
        sink = None if attn_sink is None else attn_sink.to(torch.float32).contiguous()
        length = None if topk_length is None else topk_length.to(torch.int32).contiguous()
        out, lse, _ = _core().sparse_mla(q.contiguous(), kv.contiguous(), indices.to(torch.int32).contiguous(),
                                         scale=scale, attn_sink=sink, topk_length=length)
        return out.to(q.dtype), lse
    out, lse = _fallback.sparse_mla(q, kv, indices, topk_length, attn_sink, scale)
    return out.to(q.dtype), lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def _mla_cuda_backward_takes(q, kv, *more, out, grad_out):
    """Whether keysel's CUDA sparse MLA backward runs these tensors: a CUDA build, backend not "torch", every tensor
    (`more`: indices, topk_length, attn_sink, grad_lse; None skipped) on q's GPU, q and kv both bfloat16 or both
    float32, out and grad_out bfloat16 or float32."""
    if _settings["backend"] == "torch" or q.device.type != "cuda" or _core() is None:
        return False
    if not _core().built_with_cuda():
        return False
    if any(x is not None and x.device != q.device for x in (kv, out, grad_out) + more):
        return False
    floats = (torch.bfloat16, torch.float32)
    return q.dtype == kv.dtype and q.dtype in floats and out.dtype in floats and grad_out.dtype in floats


def _sparse_mla_backward_impl(q, kv, indices, topk_length, attn_sink, out, lse, grad_out, grad_lse, scale):
    """(dq, dkv, dsink) of sparse_mla (SPEC §9.2): keysel's deterministic CPU kernel where the compiled core takes
    the CPU tensors, its deterministic CUDA kernel for CUDA tensors it takes (_mla_cuda_backward_takes), the
    gather-based pure-torch backward otherwise. dsink is zeros [H] without a sink."""
    cuda = _mla_cuda_backward_takes(q, kv, indices, topk_length, attn_sink, grad_lse, out=out, grad_out=grad_out)
    if cuda or (_use_core(q, kv) and q.device.type == "cpu"
                and grad_out.dtype in (torch.float32, torch.float16, torch.bfloat16)):
        sink = None if attn_sink is None else attn_sink.to(torch.float32).contiguous()
        length = None if topk_length is None else topk_length.to(torch.int32).contiguous()
        dq, dkv, dsink = _core().sparse_mla_backward(
            q.contiguous(), kv.contiguous(), indices.to(torch.int32).contiguous(), out.contiguous(),
            lse.to(torch.float32).contiguous(), grad_out.contiguous(),
            grad_lse=None if grad_lse is None else grad_lse.to(torch.float32).contiguous(), scale=scale,
            attn_sink=sink, topk_length=length)
    else:
        dq, dkv, dsink = _fallback.sparse_mla_backward(q, kv, indices, topk_length, attn_sink, scale, grad_out,
                                                       grad_lse)
    if dsink is None:
        dsink = q.new_zeros((q.shape[1],), dtype=torch.float32)
    sink_dtype = torch.float32 if attn_sink is None else attn_sink.dtype
    return dq.to(q.dtype), dkv.to(kv.dtype), dsink.to(sink_dtype)


def _mla_setup_context(ctx, inputs, output):
    q, kv, indices, topk_length, attn_sink, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, kv, indices, topk_length, attn_sink, out, lse)
    ctx.scale = scale
    ctx.set_materialize_grads(False)


def _mla_backward(ctx, grad_out, grad_lse, backward):
    q, kv, indices, topk_length, attn_sink, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dkv, dsink = backward(q, kv, indices, topk_length, attn_sink, out, lse, grad_out, grad_lse, ctx.scale)
    return dq, dkv, None, None, (None if attn_sink is None else dsink), None


class _SparseMlaFunction(torch.autograd.Function):
    """sparse_mla with keysel's backward, for a torch without torch.library.custom_op (torch < 2.4)."""

    @staticmethod
    def forward(ctx, q, kv, indices, topk_length, attn_sink, scale):
        output = _sparse_mla_impl(q, kv, indices, topk_length, attn_sink, scale)
        _mla_setup_context(ctx, (q, kv, indices, topk_length, attn_sink, scale), output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return _mla_backward(ctx, grad_out, grad_lse, _sparse_mla_backward_impl)


class _SparseAttentionFunction(torch.autograd.Function):
    """sparse_attention with keysel's backward, for a torch without torch.library.custom_op (torch < 2.4);
    newer torches register the same backward on torch.ops.keysel.sparse_attention."""

    @staticmethod
    def forward(ctx, q, k_cache, v_cache, selection, granularity, scale, deterministic):
        output = _sparse_attention_impl(q, k_cache, v_cache, selection, granularity, scale)
        _attention_setup_context(ctx, (q, k_cache, v_cache, selection, granularity, scale, deterministic), output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return _attention_backward(ctx, grad_out, grad_lse, _sparse_attention_backward_impl)


_ops_registered = False
if _TORCH_VERSION >= (2, 4):
    try:
        @torch.library.custom_op("keysel::topk_select", mutates_args=())
        def _topk_select_op(scores: torch.Tensor, positions: torch.Tensor, k: int, n_sink: int, n_local: int,
                            kept_on_top: bool) -> torch.Tensor:
            return _topk_select_impl(scores, positions, k, n_sink, n_local, kept_on_top)

        @_topk_select_op.register_fake
        def _(scores, positions, k, n_sink, n_local, kept_on_top):
            width = _fallback.selection_width(k, n_sink, n_local, kept_on_top)
            return scores.new_empty((scores.shape[0], scores.shape[1], width), dtype=torch.int32)

        @torch.library.custom_op("keysel::exact_topk", mutates_args=())
        def _exact_topk_op(q: torch.Tensor, k_cache: torch.Tensor, positions: torch.Tensor, k: int,
                           granularity: str, scale: float, n_sink: int, n_local: int) -> torch.Tensor:
            return _exact_topk_impl(q, k_cache, positions, k, granularity, scale, n_sink, n_local)

        @_exact_topk_op.register_fake
        def _(q, k_cache, positions, k, granularity, scale, n_sink, n_local):
            groups = _fallback.group_count(granularity, q.shape[1], k_cache.shape[1])
            return q.new_empty((q.shape[0], groups, k), dtype=torch.int32)

        @torch.library.custom_op("keysel::exact_topk_from", mutates_args=())
        def _exact_topk_from_op(q: torch.Tensor, k_cache: torch.Tensor, positions: torch.Tensor,
                                key_start: torch.Tensor, k: int, granularity: str, scale: float, n_sink: int,
                                n_local: int) -> torch.Tensor:
            return _exact_topk_from_impl(q, k_cache, positions, key_start, k, granularity, scale, n_sink, n_local)

        @_exact_topk_from_op.register_fake
        def _(q, k_cache, positions, key_start, k, granularity, scale, n_sink, n_local):
            groups = _fallback.group_count(granularity, q.shape[1], k_cache.shape[1])
            return q.new_empty((q.shape[0], groups, k), dtype=torch.int32)

        @torch.library.custom_op("keysel::sparse_attention", mutates_args=())
        def _sparse_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 selection: torch.Tensor, granularity: str, scale: float,
                                 deterministic: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
            return _sparse_attention_impl(q, k_cache, v_cache, selection, granularity, scale)

        @_sparse_attention_op.register_fake
        def _(q, k_cache, v_cache, selection, granularity, scale, deterministic=None):
            out = q.new_empty((q.shape[0], q.shape[1], v_cache.shape[2]))
            lse = q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32)
            return out, lse

        @torch.library.custom_op("keysel::sparse_attention_backward", mutates_args=())
        def _sparse_attention_backward_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                          selection: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                          grad_out: torch.Tensor, granularity: str, scale: float,
                                          grad_lse: Optional[torch.Tensor], deterministic: Optional[bool] = None
                                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return _sparse_attention_backward_impl(q, k_cache, v_cache, selection, out, lse, grad_out, granularity,
                                                   scale, grad_lse, deterministic)

        @_sparse_attention_backward_op.register_fake
        def _(q, k_cache, v_cache, selection, out, lse, grad_out, granularity, scale, grad_lse, deterministic=None):
            return torch.empty_like(q), torch.empty_like(k_cache), torch.empty_like(v_cache)

        @torch.library.custom_op("keysel::sparse_mla", mutates_args=())
        def _sparse_mla_op(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor,
                           topk_length: Optional[torch.Tensor], attn_sink: Optional[torch.Tensor],
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
            return _sparse_mla_impl(q, kv, indices, topk_length, attn_sink, scale)

        @_sparse_mla_op.register_fake
        def _(q, kv, indices, topk_length, attn_sink, scale):
            lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            return q.new_empty((q.shape[0], q.shape[1], 512)), q.new_empty(q.shape[:2], dtype=lse_dtype)

        @torch.library.custom_op("keysel::sparse_mla_backward", mutates_args=())
        def _sparse_mla_backward_op(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor,
                                    topk_length: Optional[torch.Tensor], attn_sink: Optional[torch.Tensor],
                                    out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
                                    grad_lse: Optional[torch.Tensor],
                                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return _sparse_mla_backward_impl(q, kv, indices, topk_length, attn_sink, out, lse, grad_out, grad_lse,
                                             scale)

        @_sparse_mla_backward_op.register_fake
        def _(q, kv, indices, topk_length, attn_sink, out, lse, grad_out, grad_lse, scale):
            sink_dtype = torch.float32 if attn_sink is None else attn_sink.dtype
            return torch.empty_like(q), torch.empty_like(kv), q.new_empty((q.shape[1],), dtype=sink_dtype)

        _sparse_mla_op.register_autograd(
            lambda ctx, grad_out, grad_lse: _mla_backward(ctx, grad_out, grad_lse,
                                                          torch.ops.keysel.sparse_mla_backward),
            setup_context=_mla_setup_context)

        _sparse_attention_op.register_autograd(
            lambda ctx, grad_out, grad_lse: _attention_backward(ctx, grad_out, grad_lse,
                                                                torch.ops.keysel.sparse_attention_backward),
            setup_context=_attention_setup_context)

        _ops_registered = True
    except (AttributeError, RuntimeError):  # an older torch.library, or the ops already exist in this process
        _ops_registered = hasattr(torch.ops, "keysel") and hasattr(torch.ops.keysel, "sparse_attention")


def ops_registered():
    """Whether torch.ops.keysel.* exist (torch >= 2.4)."""
    return _ops_registered


def topk_select(scores, positions, k, *, n_sink=0, n_local=0, kept_on_top=False):
    """Top-k of a score [T, G, N] over allowed keys (s <= positions[t]) plus the kept keys -> int32 [T, G, W]."""
    if _ops_registered:
        return torch.ops.keysel.topk_select(scores, positions, k, n_sink, n_local, kept_on_top)
    return _topk_select_impl(scores, positions, k, n_sink, n_local, kept_on_top)


def exact_topk(q, k_cache, positions, k, *, granularity="per_kv_head", scale=None, n_sink=0, n_local=0):
    """The exact top-k (SPEC §2) of q [T, Hq, D] over k_cache [N, Hkv, D] -> int32 [T, G, k]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _ops_registered:
        return torch.ops.keysel.exact_topk(q, k_cache, positions, k, granularity, scale, n_sink, n_local)
    return _exact_topk_impl(q, k_cache, positions, k, granularity, scale, n_sink, n_local)


def exact_topk_from(q, k_cache, positions, key_start, k, *, granularity="per_kv_head", scale=None, n_sink=0,
                    n_local=0):
    """exact_topk over keys [key_start, N) only (an int64 scalar tensor: keys before it are padding), in the
    positions of the whole cache -> int32 [T, G, k]. positions[t] must be >= key_start."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    key_start = torch.as_tensor(key_start, dtype=torch.int64)
    if _ops_registered:
        return torch.ops.keysel.exact_topk_from(q, k_cache, positions, key_start, k, granularity, scale, n_sink,
                                                n_local)
    return _exact_topk_from_impl(q, k_cache, positions, key_start, k, granularity, scale, n_sink, n_local)


def sparse_attention(q, k_cache, v_cache, selection, *, granularity="per_kv_head", scale=None, deterministic=None):
    """Attention of q [T, Hq, D] over the selected keys -> (out [T, Hq, Dv] in q's dtype, lse float32 [T, Hq]).

    Differentiable in q, k_cache and v_cache through out and lse (SPEC §9; the selection is a constant; d lse /
    d logit = P): the backward is keysel's deterministic CPU kernel on CPU tensors (float32/float16/bfloat16),
    its CUDA kernels on CUDA tensors all bfloat16 or all float32 with D, Dv <= 256, and a gather-based pure-torch
    backward elsewhere (other CUDA tensors, float64, backend "torch").

    On CUDA tensors all bfloat16, the forward is keysel's tiled tensor-core prefill kernel where it takes the
    shape (T >= TILED_MIN_TOKENS = 64 query tokens, D and Dv of 64 or 128, Hq / Hkv dividing 64, per_kv_head or
    per_token), else its decode kernel (D == Dv in {64, 128, 256}). The CUDA backward is the tiled kernel
    (atomics: not bitwise reproducible; P and dS rounded to bfloat16 as in flash attention's backward) where it
    takes the shape, unless `deterministic` is True; deterministic=None (the default) means True exactly when
    torch.are_deterministic_algorithms_enabled() when the backward runs. Otherwise, and always on the CPU, the
    deterministic kernel."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    deterministic = None if deterministic is None else bool(deterministic)
    if _ops_registered:
        return torch.ops.keysel.sparse_attention(q, k_cache, v_cache, selection, granularity, scale, deterministic)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k_cache, v_cache)):
        return _SparseAttentionFunction.apply(q, k_cache, v_cache, selection, granularity, scale, deterministic)
    return _sparse_attention_impl(q, k_cache, v_cache, selection, granularity, scale)


def sparse_mla(q, kv, indices, *, topk_length=None, attn_sink=None, scale=None):
    """DeepSeek-V3.2's sparse MLA (SPEC §8) over a latent cache, differentiable (SPEC §9.2) -> (out [T, H, 512] in
    q's dtype, lse [T, H] float32, float64 for float64 q).

    q [T, H, 576]; kv [N, 576] (the value of a slot is its first 512 channels); indices int [T, k]: slots, -1
    (or any value outside [0, N)) invalid; topk_length int [T] or None: only the first topk_length[t] entries of
    row t count; attn_sink [H] or None: an extra logit per head in the denominator only; scale default
    1/sqrt(576). A row with no valid slot gets out = 0 and lse = -inf. Gradients flow into q, kv and attn_sink
    through out and lse (indices and topk_length are constants). CPU tensors of float32/float16/bfloat16 run
    keysel's kernels (the forward's sparse_mla and the deterministic sparse_mla_backward, which reject an index
    >= N or a slot repeated in a row with keysel.Error). CUDA tensors run the forward as a gather-based pure-torch
    version of the same definition and, with q and kv both bfloat16 or both float32, the backward as keysel's
    deterministic CUDA kernel (sparse_mla_backward on the GPU; an index outside [0, N) is invalid there); other
    tensors (float64, backend "torch") run the pure-torch version both ways. The fp8 V3.2 cache is not
    differentiated."""
    scale = 1.0 / math.sqrt(576) if scale is None else float(scale)
    if _ops_registered:
        return torch.ops.keysel.sparse_mla(q, kv, indices, topk_length, attn_sink, scale)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, kv, attn_sink)):
        return _SparseMlaFunction.apply(q, kv, indices, topk_length, attn_sink, scale)
    return _sparse_mla_impl(q, kv, indices, topk_length, attn_sink, scale)


# ----------------------------------------------------------------------------------------------- indexer training


def indexer_kl_loss(index_q, index_w, index_k, attention, positions, selection=None, *, scale=None,
                    reduction="mean"):
    """The Lightning Indexer's training loss as DeepSeek-V3.2 trains it (SPEC §9.1), differentiable in the
    indexer's tensors.

    index_q [T, HI, DI], index_w [T, HI], index_k [N, DI]: the indexer's queries, head weights and keys of one
        sequence; the score is I[t, s] = sum_j index_w[t, j] ReLU(index_q[t, j] . index_k[s]) (SPEC §3)
    attention: the target, no gradient flows into it: either pbar [T, N] (the main attention's probabilities
        averaged over heads), or a pair (q [T, Hq, D], k_cache [N, Hkv, D]) of the main attention from which pbar
        is computed (per_token group mean, softmax scale `scale`, default 1/sqrt(D))
    positions: int [T]: query t reads keys s <= positions[t]
    selection: None for the dense warm-up (KL(pbar || softmax I) over every allowed key), or int [T, W] /
        [T, 1, W] (the per_token selection, -1 padded) for the sparse stage: the KL over the selected keys with
        both distributions renormalised on them. In the sparse stage the indexer's input is detached from the main
        model (compute index_q / index_k from hidden_states.detach()) so the loss trains the indexer only.
    reduction: "mean" over the query tokens that have keys (and target mass on them), or "sum".
    Returns a scalar tensor: float64 when index_q is float64, else float32. The gradient with respect to I is
    softmax(I) - pbar (restricted and renormalised); keysel.indexer_kl_loss_reference is the double-precision
    reference.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"keysel.torch.indexer_kl_loss: reduction must be 'mean' or 'sum'; got {reduction!r}")
    if index_q.dim() != 3 or index_w.dim() != 2 or index_k.dim() != 2:
        raise ValueError("keysel.torch.indexer_kl_loss: expected index_q [T, HI, DI], index_w [T, HI] and index_k "
                         f"[N, DI]; got {list(index_q.shape)}, {list(index_w.shape)}, {list(index_k.shape)}")
    t, hi, di = index_q.shape
    n = index_k.shape[0]
    if tuple(index_w.shape) != (t, hi) or index_k.shape[1] != di:
        raise ValueError(f"keysel.torch.indexer_kl_loss: index_w must be [{t}, {hi}] and index_k [N, {di}]; got "
                         f"{list(index_w.shape)} and {list(index_k.shape)}")
    compute = torch.float64 if index_q.dtype == torch.float64 else torch.float32
    device = index_q.device
    positions = positions.to(device=device, dtype=torch.int64)
    with torch.no_grad():
        if isinstance(attention, (tuple, list)):
            q, k_cache = attention
            d = q.shape[-1]
            main_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
            pbar = _fallback.group_probabilities(q.detach(), k_cache.detach(), positions, "per_token",
                                                 main_scale)[:, 0, :]
        else:
            pbar = attention.detach()
        if tuple(pbar.shape) != (t, n):
            raise ValueError(f"keysel.torch.indexer_kl_loss: the target must be [T, N] = [{t}, {n}]; got "
                             f"{list(pbar.shape)}")
        pbar = pbar.to(device=device, dtype=compute)
        keys = torch.arange(n, device=device)
        mask = keys[None, :] <= positions[:, None]                              # allowed [T, N]
        if selection is not None:
            sel = selection.to(device=device, dtype=torch.int64).reshape(t, -1)
            chosen = torch.zeros(t, n + 1, dtype=torch.bool, device=device)
            chosen.scatter_(1, torch.where(sel >= 0, sel, torch.full_like(sel, n)), True)
            mask = mask & chosen[:, :n]
        target = torch.where(mask, pbar, torch.zeros_like(pbar))
        mass = target.sum(-1)
        live = mask.any(-1) & (mass > 0)
        ptilde = target / torch.where(live, mass, torch.ones_like(mass))[:, None]
        entropy_part = torch.xlogy(ptilde, ptilde).sum(-1)                      # sum p log p (constant)
    dots = torch.einsum("tjd,sd->tjs", index_q.to(compute), index_k.to(compute))
    scores = (index_w.to(compute)[:, :, None] * torch.relu(dots)).sum(1)        # I [T, N]
    readable = mask & live[:, None]
    masked = torch.where(readable, scores, torch.full_like(scores, float("-inf")))
    masked = torch.where(live[:, None], masked, torch.zeros_like(scores))      # rows without keys: no NaN
    log_q = torch.log_softmax(masked, dim=-1)
    cross = (ptilde * torch.where(readable, log_q, torch.zeros_like(log_q))).sum(-1)
    per_row = torch.where(live, entropy_part - cross, torch.zeros_like(cross))
    total = per_row.sum()
    if reduction == "mean":
        total = total / live.sum().clamp_min(1).to(compute)
    return total


# ----------------------------------------------------------------------------------------------- statistics

_AGGREGATES = ("mean", "min", "p5", "p50", "p95", "count")


class TopkStats:
    """SPEC §4 metrics of every selection topk_attention made, per layer, against the exact top-k.

    Each recorded call adds its rows (query token x group, per batch element) to its layer. rows(layer) gives the
    per-row values of each metric as float64 tensors; summary() the aggregates of every layer (and of all layers
    together under "all"): mean, min, p5, p50, p95 (linear interpolation between order statistics) and count,
    as keysel.metrics aggregates: NaN rows are left out; +inf (kl of a row with no selected mass) counts.
    """

    def __init__(self):
        self._rows = {}  # layer -> metric -> list of float64 tensors
        self._lock = threading.Lock()

    def record(self, layer, metrics):
        """Adds the per-row arrays of a keysel.metrics result (its "aggregates" entry is ignored)."""
        layer = 0 if layer is None else layer
        with self._lock:
            store = self._rows.setdefault(layer, {})
            for name, values in metrics.items():
                if name == "aggregates" or isinstance(values, dict):
                    continue
                tensor = torch.as_tensor(values).detach().to("cpu", torch.float64).reshape(-1)
                store.setdefault(name, []).append(tensor)

    @property
    def layers(self):
        """The layers recorded so far, sorted."""
        return sorted(self._rows, key=lambda x: (str(type(x)), x))

    def rows(self, layer):
        """metric -> float64 tensor of every row recorded for `layer`."""
        return {name: torch.cat(parts) for name, parts in self._rows[layer].items()}

    @staticmethod
    def _aggregate(values):
        values = values[~torch.isnan(values)]
        n = values.numel()
        if n == 0:
            return {"mean": math.nan, "min": math.nan, "p5": math.nan, "p50": math.nan, "p95": math.nan, "count": 0}
        ordered = torch.sort(values).values

        def quantile(p):
            x = p * (n - 1)
            lo = int(math.floor(x))
            hi = min(lo + 1, n - 1)
            a, b = ordered[lo].item(), ordered[hi].item()
            return a if hi == lo or a == b else a + (x - lo) * (b - a)

        return {"mean": values.mean().item(), "min": ordered[0].item(), "p5": quantile(0.05),
                "p50": quantile(0.5), "p95": quantile(0.95), "count": n}

    def summary(self):
        """{layer: {metric: {mean, min, p5, p50, p95, count}}}, plus "all" over every layer."""
        out = {}
        everything = {}
        for layer in self.layers:
            rows = self.rows(layer)
            out[layer] = {name: self._aggregate(values) for name, values in rows.items()}
            for name, values in rows.items():
                everything.setdefault(name, []).append(values)
        if everything:
            out["all"] = {name: self._aggregate(torch.cat(parts)) for name, parts in everything.items()}
        return out

    def reset(self):
        with self._lock:
            self._rows.clear()

    def __repr__(self):
        return f"TopkStats(layers={self.layers})"


# ----------------------------------------------------------------------------------------------- settings

_DEFAULTS = {"k": None, "granularity": "per_kv_head", "selector": "exact", "n_sink": 0, "n_local": 0,
             "stats": None, "backend": "auto"}
_settings = dict(_DEFAULTS)
_HF_KEYS = ("k", "granularity", "selector", "n_sink", "n_local", "stats")


def _check_setting(name, value):
    if name not in _DEFAULTS:
        raise ValueError(f"keysel.torch: unknown setting {name!r}; expected one of {', '.join(_DEFAULTS)}")
    if name == "k" and value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"keysel.torch: k must be an integer >= 1; got {value!r}")
    if name == "granularity" and value not in GRANULARITIES:
        raise ValueError(f"keysel.torch: granularity must be one of {', '.join(GRANULARITIES)}; got {value!r}")
    if name in ("n_sink", "n_local") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"keysel.torch: {name} must be an integer >= 0; got {value!r}")
    if name == "stats" and value is not None and not hasattr(value, "record"):
        raise ValueError(f"keysel.torch: stats must be a TopkStats (or have .record(layer, metrics)); got {value!r}")
    if name == "backend" and value not in ("auto", "keysel", "torch"):
        raise ValueError(f"keysel.torch: backend must be 'auto', 'keysel' or 'torch'; got {value!r}")


def configure(**kwargs):
    """Sets the defaults of attn_implementation="keysel_topk" (and of backend for every call); registers it.

    Keys: k (required before a model runs), granularity ("per_kv_head"), selector ("exact", a spec for
    keysel.make_selector, or a callable), n_sink (0), n_local (0), stats (None or a TopkStats), backend ("auto",
    "keysel", "torch"). A model's config may override any of the first six with a dict attribute
    `keysel_topk`, e.g. LlamaConfig(..., keysel_topk={"k": 64}). Returns the previous settings."""
    for name, value in kwargs.items():
        _check_setting(name, value)
    previous = dict(_settings)
    _settings.update(kwargs)
    _selectors.clear()
    with contextlib.suppress(ImportError):
        register_transformers()
    return previous


def settings():
    """A copy of the current defaults."""
    return dict(_settings)


@contextlib.contextmanager
def options(**kwargs):
    """configure(**kwargs) for the duration of a with-block."""
    previous = configure(**kwargs)
    try:
        yield
    finally:
        _settings.clear()
        _settings.update(previous)
        _selectors.clear()


# ----------------------------------------------------------------------------------------------- selection

_selectors = {}  # (spec text, layer) -> selector object of keysel.make_selector


def _spec_text(spec):
    return spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True)


def _make_selector(spec, layer):
    key = (_spec_text(spec), layer)
    selector = _selectors.get(key)
    if selector is None:
        core = _core()
        if core is None or not hasattr(core, "make_selector"):
            raise ImportError("keysel.torch: a selector spec needs keysel.make_selector from the compiled core "
                              "(keysel._C cannot be imported); selector='exact' and callables work without it")
        selector = core.make_selector(spec)
        _selectors[key] = selector
    return selector


def _cpu32(x):
    return x.detach().to("cpu", torch.float32).contiguous()


def _select(selector, q, k_cache, positions, k, granularity, scale, n_sink, n_local, layer, indexer=None,
            key_start=None):
    """int32 [T, G, W] for one sequence; indexer: None or (q_index [T, HI, DI], k_index [N, DI], weights [T, HI]);
    key_start: None or an int64 scalar tensor, the first key any query may read (keys before it are padding)."""
    if isinstance(selector, str) and selector == "exact":
        if key_start is not None:
            return exact_topk_from(q, k_cache, positions, key_start, k, granularity=granularity, scale=scale,
                                   n_sink=n_sink, n_local=n_local)
        return exact_topk(q, k_cache, positions, k, granularity=granularity, scale=scale, n_sink=n_sink,
                          n_local=n_local)
    if key_start is not None:  # eager selectors see only the readable keys, then positions shift back
        first = int(key_start)
        if indexer is not None:
            indexer = (indexer[0], indexer[1][first:], indexer[2])
        selection = _select(selector, q, k_cache[first:], positions - first, k, granularity, scale, n_sink, n_local,
                            layer, indexer)
        return torch.where(selection >= 0, selection + first, selection)
    extra = {}
    if isinstance(selector, (str, dict)):
        if indexer is None:
            selector = _make_selector(selector, layer)
        else:  # a fresh selector over this sequence's indexer keys, as keysel's tiny-lm study builds one per layer
            core = _core()
            if core is None or not hasattr(core, "make_selector"):
                raise ImportError("keysel.torch: a selector spec needs keysel.make_selector from the compiled core")
            indexer = tuple(_cpu32(x) for x in indexer)
            selector = core.make_selector(selector, indexer=indexer)
            extra = {"q_index": indexer[0], "weights": indexer[2]}
    elif indexer is not None:
        extra = {"indexer": indexer}
    select = selector.select if hasattr(selector, "select") else selector
    device = q.device
    if not callable(select):
        raise ValueError(f"keysel.torch: selector must be 'exact', a selector spec (dict or JSON text), an object "
                         f"with .select or a callable; got {selector!r}")
    if hasattr(selector, "select"):  # a keysel selector: fp32 CPU tensors
        q, k_cache, positions = _cpu32(q), _cpu32(k_cache), positions.to("cpu", torch.int32)
        if "indexer" in extra:
            extra = {"q_index": _cpu32(indexer[0]), "weights": _cpu32(indexer[2])}
    selection = select(q, k_cache, positions, k, granularity=granularity, scale=scale, n_sink=n_sink,
                       n_local=n_local, **extra)
    selection = torch.as_tensor(selection).to(device=device, dtype=torch.int32)
    groups = _fallback.group_count(granularity, q.shape[1], k_cache.shape[1])
    if selection.dim() != 3 or selection.shape[0] != q.shape[0] or selection.shape[1] != groups:
        raise ValueError(f"keysel.torch: the selector returned a selection of shape {tuple(selection.shape)}; "
                         f"expected [T={q.shape[0]}, G={groups}, W]")
    return selection


def _record(stats, layer, q, k_cache, v_cache, positions, selection, k, granularity, scale):
    core = _core()
    if core is None or not hasattr(core, "metrics"):
        raise ImportError("keysel.torch: stats need keysel.metrics from the compiled core (keysel._C cannot be "
                          "imported)")
    dev = torch.device("cpu")
    metrics = core.metrics(_as_float(q).to(dev).contiguous(), _as_float(k_cache).to(dev).contiguous(),
                           _as_float(v_cache).to(dev).contiguous(), positions.to(dev, torch.int32).contiguous(),
                           selection.to(dev, torch.int32).contiguous(), k, granularity=granularity, scale=scale)
    stats.record(layer, metrics)


# ----------------------------------------------------------------------------------------------- topk_attention


def _check_layout(query, key, value, k, granularity, n_sink, n_local):
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"keysel.torch.topk_attention: {name} must be a 4-D tensor [B, H, T or N, D]; got "
                             f"{shape}")
        if not x.is_floating_point():
            raise ValueError(f"keysel.torch.topk_attention: {name} must be floating point; got {x.dtype}")
    b, hq, _, d = query.shape
    if key.shape[0] != b or value.shape[0] != b or key.shape[1] != value.shape[1] or key.shape[2] != value.shape[2]:
        raise ValueError(f"keysel.torch.topk_attention: key {tuple(key.shape)} and value {tuple(value.shape)} must "
                         f"be [B={b}, Hkv, N, D] and [B={b}, Hkv, N, Dv]")
    if key.shape[3] != d:
        raise ValueError(f"keysel.torch.topk_attention: key head dim must equal query's ({d}); got {key.shape[3]}")
    hkv = key.shape[1]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"keysel.torch.topk_attention: key heads ({hkv}) must divide query heads ({hq})")
    if key.device != query.device or value.device != query.device:
        raise ValueError(f"keysel.torch.topk_attention: query, key and value must be on one device; got "
                         f"{query.device}, {key.device}, {value.device}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"keysel.torch.topk_attention: k must be an integer >= 1; got {k!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"keysel.torch.topk_attention: granularity must be one of {', '.join(GRANULARITIES)}; got "
                         f"{granularity!r}")
    for name, v in (("n_sink", n_sink), ("n_local", n_local)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"keysel.torch.topk_attention: {name} must be an integer >= 0; got {v!r}")
    if n_sink + n_local > k:
        raise ValueError(f"keysel.torch.topk_attention: the kept keys count toward k: n_sink + n_local "
                         f"({n_sink} + {n_local}) must be <= k ({k})")


def topk_attention(query, key, value, *, k, is_causal=True, scale=None, granularity="per_kv_head",
                   selector="exact", n_sink=0, n_local=0, stats=None, layer=None, key_start=None,
                   query_positions=None, indexer=None):
    """Attention of each query over only its k selected keys, in the layout of F.scaled_dot_product_attention.

    query [B, Hq, T, D], key [B, Hkv, N, D], value [B, Hkv, N, Dv] (Hkv divides Hq) -> [B, Hq, T, Dv], query's
    dtype.
      k            keys per query token and selection group (k >= N reads every allowed key: full attention)
      is_causal    True: query t is at key position N - T + t and reads keys <= it; False: every key
      scale        softmax scale, default 1/sqrt(D)
      granularity  "per_head", "per_kv_head" (default) or "per_token": which query heads share one selection
      selector     "exact" (the exact top-k of the group's attention), a spec for keysel.make_selector (dict or
                   JSON text), or a callable f(q, k_cache, positions, k, *, granularity, scale, n_sink, n_local)
                   on one sequence (q [T, Hq, D], k_cache [N, Hkv, D], positions int32 [T]) returning int32
                   [T, G, W] (ascending positions, -1 padding)
      n_sink, n_local  keys always kept (the first n_sink positions, the last n_local allowed ones); they count
                   toward k
      stats        a TopkStats: records SPEC §4 metrics of the selection against the exact top-k under `layer`
      key_start    optional int64 [B]: keys before key_start[b] are padding that no query of sequence b reads;
                   or [B, T]: query t of sequence b reads no key before key_start[b, t] (sliding windows, packed
                   sequences; one selector call per distinct first key)
      query_positions  optional int [B, T]: the key position of each query (overrides is_causal); a negative
                   entry marks a padding query, whose output is zeros
      indexer      optional trained Lightning-Indexer tensors (q_index [B, T, HI, DI], k_index [B, N, DI],
                   weights [B, T, HI]), a tuple or a dict: a selector spec of type "indexer" (or a hybrid over one)
                   then scores with them (a fresh keysel selector per call); a callable selector receives them as
                   indexer=(q_index, k_index, weights) of one sequence
    """
    _check_layout(query, key, value, k, granularity, n_sink, n_local)
    b, hq, t, d = query.shape
    n = key.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"keysel.torch.topk_attention: scale must be finite; got {scale}")
    if stats is not None and _is_compiling():
        raise RuntimeError("keysel.torch.topk_attention: stats are recorded eagerly; run without torch.compile")
    if query_positions is None and is_causal and t > n:
        raise ValueError(f"keysel.torch.topk_attention: a causal call needs T <= N (queries at the last T key "
                         f"positions); got T={t}, N={n}")
    if query_positions is None:
        if is_causal:
            positions = torch.arange(n - t, n, device=query.device, dtype=torch.int32)
        else:
            positions = torch.full((t,), n - 1, device=query.device, dtype=torch.int32)
    outputs = []
    for i in range(b):
        q = query[i].transpose(0, 1).contiguous()                # [T, Hq, D]
        kc = key[i].transpose(0, 1).contiguous()                 # [N, Hkv, D]
        vc = value[i].transpose(0, 1).contiguous()               # [N, Hkv, Dv]
        start = None if key_start is None else torch.as_tensor(key_start[i]).to(query.device, torch.int64)
        if query_positions is None:
            pos, live = positions, None
        else:
            raw = query_positions[i].to(device=query.device, dtype=torch.int64)
            live = raw >= 0
            pos = (raw.clamp_min(0) if start is None else torch.maximum(raw, start)).to(torch.int32)
        seq_indexer = None
        if indexer is not None:
            qi, ki, wi = ((indexer["q_index"], indexer["k_index"], indexer["weights"]) if isinstance(indexer, dict)
                          else indexer)
            seq_indexer = (qi[i], ki[i], wi[i])
        if start is None or start.dim() == 0:
            runs = [(slice(None), start)]
        else:  # a first key per query (sliding windows, packed sequences): one selection per distinct first key
            runs = [((start == s).nonzero().squeeze(1), s) for s in torch.unique(start)]
        parts = []
        with torch.no_grad():  # the selection is a constant of the gradient (SPEC §9)
            qd, kd = q.detach(), kc.detach()
            for rows, first in runs:
                run_indexer = (None if seq_indexer is None
                               else (seq_indexer[0][rows], seq_indexer[1], seq_indexer[2][rows]))
                parts.append((rows, first, _select(selector, qd[rows], kd, pos[rows], k, granularity, scale, n_sink,
                                                   n_local, layer, run_indexer, key_start=first)))
        if len(parts) == 1:
            selection = parts[0][2]
        else:
            width = max(part.shape[2] for _, _, part in parts)
            selection = torch.full((t, parts[0][2].shape[1], width), -1, dtype=torch.int32, device=query.device)
            for rows, _, part in parts:
                selection[rows, :, :part.shape[2]] = part
        out, _ = sparse_attention(q, kc, vc, selection, granularity=granularity, scale=scale)
        if live is not None:
            out = out * live[:, None, None].to(out.dtype)
        if stats is not None:  # eagerly, on the keys the queries may read: [first, N)
            for rows, first, part in parts:
                first = 0 if first is None else int(first)
                keep = torch.ones(t, dtype=torch.bool, device=query.device) if live is None else live.clone()
                if not isinstance(rows, slice):
                    chosen = torch.zeros_like(keep)
                    chosen[rows] = True
                    keep &= chosen
                shifted = torch.where(selection >= 0, selection - first, selection)
                _record(stats, layer, q.detach()[keep], kc.detach()[first:], vc.detach()[first:], pos[keep] - first,
                        shifted[keep], k, granularity, scale)
        outputs.append(out)
    return torch.stack(outputs).transpose(1, 2)                   # [B, Hq, T, Dv]


# ----------------------------------------------------------------------------------------------- transformers


def _model_settings(module):
    merged = {name: _settings[name] for name in _HF_KEYS}
    config = getattr(module, "config", None)
    override = getattr(config, "keysel_topk", None) if config is not None else None
    if override:
        if not isinstance(override, dict):
            raise ValueError(f"keysel.torch: config.keysel_topk must be a dict; got {type(override).__name__}")
        for name, value in override.items():
            if name not in _HF_KEYS:
                raise ValueError(f"keysel.torch: config.keysel_topk has unknown key {name!r}; expected one of "
                                 f"{', '.join(_HF_KEYS)}")
            _check_setting(name, value)
            merged[name] = value
    if merged["k"] is None:
        raise ValueError("keysel.torch: attn_implementation='keysel_topk' needs k: call keysel.torch.configure(k=...) "
                         "or give the model config keysel_topk={'k': ...}")
    return merged


def _mask_layout(mask, t, n):
    """A 4-D mask [B, 1|H, T, N] (bool: True = read; float: 0 = read) -> (key_start, query_positions [B, T]).

    keysel's causal rule reads a prefix of the keys; with left padding that prefix starts at the first real key.
    So every query row must read one contiguous run of keys [first_t, last_t] (rows that read nothing are padding
    queries). key_start is [B] when every query of a sequence starts at the same key (causal masks, left padding),
    else [B, T], each query's first key (sliding windows, packed sequences). Masks with gaps are refused."""
    if mask.dtype != torch.bool:
        mask = mask == 0
    mask = mask[..., -t:, :n]                                             # a mask may cover more than the call
    mask = mask[:, 0] if mask.shape[1] == 1 else mask.all(dim=1)          # [B, T, N]
    mask = mask.expand(mask.shape[0], t, n) if mask.shape[1] != t or mask.shape[2] != n else mask
    reads = mask.any(dim=-1)                                              # [B, T]
    idx = torch.arange(n, device=mask.device)
    first = torch.where(mask, idx, n).amin(dim=-1)                        # [B, T]
    last = torch.where(mask, idx, -1).amax(dim=-1)
    count = mask.sum(dim=-1)
    start = torch.where(reads, first, n).amin(dim=-1)                     # [B]
    start = torch.where(start == n, torch.zeros_like(start), start)
    contiguous = (count == last - first + 1) | ~reads
    same_start = (first == start[:, None]) | ~reads
    positions = torch.where(reads, last, torch.full_like(last, -1))
    if _is_compiling():  # a compiled graph takes the common layout as given (no data-dependent branch)
        return start, positions
    if not bool(contiguous.all()):
        raise NotImplementedError(
            "keysel_topk: the attention mask lets a query read keys that are not one contiguous run (causal, "
            "left-padded, sliding-window and packed-sequence masks are; this one is not)")
    if bool(same_start.all()):
        return start, positions
    # Sliding windows and packed sequences: each query reads its own run [first, last].
    return torch.where(reads, first, torch.zeros_like(first)), positions


def transformers_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                           **kwargs):
    """The attention function registered as attn_implementation="keysel_topk" in transformers.

    transformers calls it with query [B, Hq, T, D], key/value [B, Hkv, N, D] (the whole cache) and the mask of
    the mask function registered beside it (transformers' sdpa_mask: None for a plain causal batch, a boolean
    [B, 1, T, N] mask with padding). Returns ([B, T, Hq, Dv], None)."""
    if dropout and module.training:
        raise NotImplementedError("keysel_topk: attention dropout in training is not supported")
    opts = _model_settings(module)
    layer = getattr(module, "layer_idx", None)
    t, n = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    key_start = query_positions = None
    if attention_mask is not None:
        key_start, query_positions = _mask_layout(attention_mask, t, n)
    elif is_causal and 1 < t < n:
        # transformers leaves out the mask where SDPA's is_causal (aligned top-left: query t at position t) is right:
        # T == N, or a prefill into an empty static cache whose slots after the T queries are still empty.
        key, value = key[:, :, :t], value[:, :, :t]
    out = topk_attention(query, key, value, k=opts["k"], is_causal=is_causal, scale=scaling,
                         granularity=opts["granularity"], selector=opts["selector"], n_sink=opts["n_sink"],
                         n_local=opts["n_local"], stats=opts["stats"], layer=layer, key_start=key_start,
                         query_positions=query_positions)
    return out.transpose(1, 2).contiguous(), None


_registered_names = set()


def register_transformers(name=ATTN_IMPLEMENTATION):
    """Registers transformers_attention as attn_implementation=`name` (and transformers' sdpa mask function for
    it, so that padding reaches the attention as a boolean mask). Raises ImportError without transformers."""
    from transformers import AttentionInterface
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # an older transformers builds its masks without this interface
        AttentionMaskInterface = sdpa_mask = None
    AttentionInterface.register(name, transformers_attention)
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(name, sdpa_mask)
    _registered_names.add(name)
