"""Context parallelism over torch.distributed (SPEC §10, docs/context-parallel.md): one sequence's keys sharded by
position over the ranks of a process group; each rank scores its own keys, and the exact global top-k comes out of
keysel's C++ exchange (the same code CI runs over simulated ranks), with torch.distributed.all_gather as the
collective. Every rank gets select_topk's selection of the whole score row, bit for bit.

    import torch.distributed as dist, keysel.distributed
    dist.init_process_group("gloo", ...)
    sel = keysel.distributed.select_topk_context_parallel(my_scores, my_positions, positions, n_keys, k=2048)

    out = keysel.distributed.sparse_attention_context_parallel(q, my_k, my_v, my_positions, positions, n_keys, sel)

These take CPU tensors. On GPUs, keysel's C++ API runs the same steps with its CUDA kernels over a NCCL
communicator (keysel/indexer/cuda_context_parallel.h).
"""

from __future__ import annotations

from . import _C
from . import _interop as _io

__all__ = ["select_topk_context_parallel", "shard_positions", "sparse_attention_context_parallel"]


def _collective(fn, group):
    """(size, rank, all_gather) of `group`: all_gather(bytes) -> every rank's bytes in rank order, through
    torch.distributed.all_gather (on this process's GPU when the group's backend is NCCL)."""
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise _io.fail(fn, "group", "an initialised torch.distributed process group", "none")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None

    def all_gather(payload: bytes) -> bytes:
        mine = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
        if device is not None:
            mine = mine.to(device)
        parts = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(parts, mine, group=group)
        return b"".join(bytes(p.cpu().numpy().tobytes()) for p in parts)

    return size, rank, all_gather


def shard_positions(rank, ranks, n, *, layout="contiguous", page=64):
    """The positions rank `rank` of `ranks` holds among 0..n-1 (int32 NumPy, ascending): "contiguous" ranges of
    ceil(n / ranks), or "round_robin" pages (page p on rank p % ranks)."""
    import numpy as np

    s = np.arange(n, dtype=np.int64)
    if layout == "round_robin":
        owner = (s // int(page)) % ranks
    elif layout == "contiguous":
        owner = np.minimum(s // max(1, -(-n // ranks)), ranks - 1)
    else:
        raise _io.fail("shard_positions", "layout", "\"contiguous\" or \"round_robin\"", repr(layout))
    return s[owner == rank].astype(np.int32)


def select_topk_context_parallel(local_scores, local_positions, positions, n_keys, k, *, n_sink=0, n_local=0,
                                 kept_on_top=False, exchange="all_gather", group=None, out=None):
    """This rank's part of a context-parallel top-k; every rank of `group` calls it.

    local_scores:    float32 [T, G, n_local] (CPU), the scores of this rank's positions
    local_positions: int32 [n_local], their global positions, ascending
    positions:       int32 [T]: query t may read keys s <= positions[t] of n_keys
    k, n_sink, n_local, kept_on_top: as select_topk
    exchange:        "all_gather" (one collective, R x k candidates received per row) or "threshold" (three
                     collectives, about 2k received per row when the shards are balanced)
    Returns int32 [T, G, W] on every rank (out= written in place) and sets .last_cost of this function to
    {"collectives", "bytes_sent", "bytes_received"} of this rank.
    """
    fn = "select_topk_context_parallel"
    size, rank, all_gather = _collective(fn, group)
    s_c, _ = _io.arg(local_scores, fn, "local_scores")
    lp_c, _ = _io.arg(local_positions, fn, "local_positions")
    p_c, _ = _io.arg(positions, fn, "positions")
    t, g, _n = _io.shape(local_scores, fn, "local_scores", 3, "[T, G, n_local]")
    width = _io.call(fn, _io.POLICY, _C.selection_width, k, n_sink, n_local, kept_on_top, fn)
    result = out if out is not None else _io.empty((t, g, width), "int32", (local_scores,), fn)
    out_c, _ = _io.arg(result, fn, "out")
    select_topk_context_parallel.last_cost = _io.call(
        fn, {"selection": "out", **_io.POLICY}, _C.select_topk_context_parallel, size, rank, all_gather, s_c, lp_c,
        p_c, int(n_keys), k, n_sink, n_local, kept_on_top, exchange, out_c)
    return result


select_topk_context_parallel.last_cost = None


def sparse_attention_context_parallel(q, local_k, local_v, local_positions, positions, n_keys, selection, *,
                                      granularity="per_kv_head", scale=0.0, group=None, out=None, lse=None):
    """This rank's part of context-parallel sparse attention; every rank of `group` calls it.

    q:               [T, Hq, D] (CPU; every rank the same queries)
    local_k/local_v: [n_local, Hkv, D] / [n_local, Hkv, Dv], this rank's rows of the cache in local_positions order
    local_positions: int32 [n_local], their global positions, ascending (shard_positions)
    positions:       int32 [T]; n_keys: the whole sequence's keys
    selection:       int32 [T, G, W] of global positions (select_topk_context_parallel's output)
    Each rank attends over the selected keys it holds; the partial (o, lse) are all-gathered and merged by
    log-sum-exp (SPEC §10). Returns float32 out [T, Hq, Dv] on every rank (out= written in place); lse= (float32
    [T, Hq]) is written when given. Sets .last_cost as select_topk_context_parallel does.
    """
    fn = "sparse_attention_context_parallel"
    size, rank, all_gather = _collective(fn, group)
    q_c, _ = _io.arg(q, fn, "q")
    k_c, _ = _io.arg(local_k, fn, "local_k")
    v_c, _ = _io.arg(local_v, fn, "local_v")
    lp_c, _ = _io.arg(local_positions, fn, "local_positions")
    p_c, _ = _io.arg(positions, fn, "positions")
    sel_c, _ = _io.arg(selection, fn, "selection")
    t, hq, _d = _io.shape(q, fn, "q", 3, "[T, Hq, D]")
    dv = _io.shape(local_v, fn, "local_v", 3, "[n_local, Hkv, Dv]")[2]
    result = out if out is not None else _io.empty((t, hq, dv), "float32", (q,), fn)
    out_c, _ = _io.arg(result, fn, "out")
    lse_c = None if lse is None else _io.arg(lse, fn, "lse")[0]
    sparse_attention_context_parallel.last_cost = _io.call(
        fn, {"k": "local_k", "v": "local_v"}, _C.sparse_attention_context_parallel, size, rank, all_gather, q_c, k_c, v_c, lp_c, p_c,
        int(n_keys), sel_c, granularity, float(scale), out_c, lse_c)
    return result


sparse_attention_context_parallel.last_cost = None
