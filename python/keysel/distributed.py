"""Context parallelism over torch.distributed (SPEC §10, docs/context-parallel.md): one sequence's keys sharded by
position over the ranks of a process group; each rank scores its own keys, and the exact global top-k comes out of
keysel's C++ exchange (the same code CI runs over simulated ranks), with torch.distributed.all_gather as the
collective. Every rank gets select_topk's selection of the whole score row, bit for bit.

    import torch.distributed as dist, keysel.distributed
    dist.init_process_group("gloo", ...)
    sel = keysel.distributed.select_topk_context_parallel(my_scores, my_positions, positions, n_keys, k=2048)

Scores are CPU tensors today (the CUDA per-rank path over NCCL is not built: no multi-GPU machine to test it on).
"""

from __future__ import annotations

from . import _C
from . import _interop as _io

__all__ = ["select_topk_context_parallel", "shard_positions"]


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
    import torch
    import torch.distributed as dist

    fn = "select_topk_context_parallel"
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
