"""keysel's DSA entry points beside the kernels the engines run, in one process on one GPU (docs/performance.md).

Run on the GPU machine after ../shared/peers' run.sh has built the peers (bench/gpu/peers.sh does both):
    LD_PRELOAD=<system libstdc++> PYTHONPATH=<DeepGEMM>:<sglang_topk build>:<keysel build>/python \
        python3 bench/gpu/dsa_peers.py [--json FILE]

Shapes follow the peer harness (../shared/peers/bench_peers.py, whose timing helpers are imported): caches rotated
past L2, per-call and CUDA-graph times, the same input distributions. Every row also checks keysel against the
peer on the same inputs: logits relative error against DeepGEMM's, top-k sets against torch.topk and SGLang.
Every keysel row has its peer timed in this process right after it, on the same inputs (no quoted figures):
    HBM copy                                   torch copy_ (bp.bench_copy)
    paged logits B=1, B=64                     DeepGEMM fp8_paged_mqa_logits
    fused select_topk_paged B=1, B=64          DeepGEMM fp8_paged_mqa_logits + SGLang fast_topk
    topk_rows B=1, B=64                        SGLang fast_topk
    prefill top-k                              torch.topk on masked rows
    prefill logits 1024 x 8192 causal          DeepGEMM fp8_mqa_logits (keysel through keysel.compat.deep_gemm,
                                               the ragged CUDA path, and keysel.indexer_logits_cuda on pages)
--only picks stages (default: all); --profile runs each stage's keysel call a few times without timing (for
Nsight Compute, bench/gpu/dsa_profile.sh).
"""

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", ".peers", "scripts"))
try:
    import bench_peers as bp  # noqa: E402  (time_calls, time_graph, random_fp8_bytes, line, emit)
except ImportError:
    if "--profile" not in sys.argv:
        raise
    import types  # --profile times nothing: the two inputs helpers it needs, as the peer harness defines them

    bp = types.SimpleNamespace(
        L2_ROTATE_BYTES=256 << 20,  # caches rotated past L2
        # random e4m3 codes with bit 6 cleared: finite, |x| < 2
        random_fp8_bytes=lambda shape, device="cuda": torch.randint(0, 256, shape, dtype=torch.uint8,
                                                                    device=device) & 0xBF)

import keysel  # noqa: E402
from keysel.compat import deep_gemm as ks_deep_gemm  # noqa: E402
from keysel.compat import sglang as ks_sglang  # noqa: E402

try:
    import deep_gemm
except Exception as exc:  # noqa: BLE001
    print(f"# DeepGEMM unavailable: {exc!r}", flush=True)
    deep_gemm = None
try:
    import flash_mla
except Exception as exc:  # noqa: BLE001
    print(f"# FlashMLA unavailable: {exc!r}", flush=True)
    flash_mla = None
try:
    import sglang_topk
except Exception as exc:  # noqa: BLE001
    print(f"# SGLang fast_topk unavailable: {exc!r}", flush=True)
    sglang_topk = None

N, HEADS, DIM, BLOCK, K = 131072, 64, 128, 64, 2048
PROFILE = False  # --profile: keysel's calls only, untimed
PROFILE_ROWS = set()  # with --profile: which of paged, fused, topk, prefill run
BATCHES = (1, 64)  # --batches


def rel(a, b):
    a, b = a.float(), b.float()
    finite = torch.isfinite(b)
    return ((a[finite] - b[finite]).norm() / b[finite].norm()).item()


def set_misses(got, want_sets):
    """Per row, how many of got's indices (>= 0) are not in the wanted set; the worst row."""
    worst = 0
    for row, want in zip(got.tolist(), want_sets):
        worst = max(worst, sum(1 for i in row if i >= 0 and i not in want))
    return worst


def indexer_decode():
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch in BATCHES:
        blocks_per_seq = N // BLOCK
        one = batch * blocks_per_seq * BLOCK * (DIM + 4)
        copies = max(1, bp.L2_ROTATE_BYTES // one)
        caches = []
        for _ in range(copies):
            kv = bp.random_fp8_bytes((batch * blocks_per_seq, BLOCK * (DIM + 4)))
            kv[:, BLOCK * DIM:].view(torch.float32).uniform_(0.005, 0.02)
            caches.append(kv.view(batch * blocks_per_seq, BLOCK, 1, DIM + 4))
        q = bp.random_fp8_bytes((batch, 1, HEADS, DIM)).view(torch.float8_e4m3fn)
        weights = torch.rand(batch, HEADS, device="cuda", dtype=torch.float32) * 0.1
        context_lens = torch.full((batch, 1), N, dtype=torch.int32, device="cuda")
        table = torch.arange(batch * blocks_per_seq, dtype=torch.int32, device="cuda").view(batch, blocks_per_seq)
        out = torch.empty(batch, N, device="cuda")
        shape = f"B={batch} N={N} HI={HEADS} DI={DIM}"
        key_bytes = batch * N * (DIM + 4)
        calls = max(copies, 4)

        def ks_logits(i):
            keysel.paged_mqa_logits(q, weights, caches[i % copies], table, context_lens, N, out=out)

        check = None
        if deep_gemm is not None and not PROFILE:
            meta = deep_gemm.get_paged_mqa_logits_metadata(context_lens, BLOCK, num_sms)
            ref = deep_gemm.fp8_paged_mqa_logits(q, caches[0], weights, context_lens, table, meta, N, False)
            ks_logits(0)
            compat = ks_deep_gemm.fp8_paged_mqa_logits(q, caches[0], weights, context_lens, table,
                                                       ks_deep_gemm.get_paged_mqa_logits_metadata(
                                                           context_lens, BLOCK, num_sms), N, False)
            torch.cuda.synchronize()
            check = ("rel_err_vs_deep_gemm", max(rel(out, ref), rel(compat, ref)))
            print(f"# check keysel paged_mqa_logits {shape} vs DeepGEMM: rel err {check[1]:.2e} "
                  f"(compat {rel(compat, ref):.2e})", flush=True)
        if PROFILE:
            for i in range(3 if "paged" in PROFILE_ROWS else 0):
                ks_logits(i)
        else:
            us, gus = bp.time_calls(ks_logits), bp.time_graph(ks_logits, calls)
            bp.line(f"keysel paged_mqa_logits {shape} (per call)", us, key_bytes)
            bp.line(f"keysel paged_mqa_logits {shape} (graph)", gus, key_bytes)
            bp.emit("keysel.paged_mqa_logits", f"{shape} engines' paged fp8 layout", us, gus, key_bytes, check=check)
        if deep_gemm is not None and not PROFILE:
            def dg_logits(i):
                return deep_gemm.fp8_paged_mqa_logits(q, caches[i % copies], weights, context_lens, table, meta, N,
                                                      False)

            us, gus = bp.time_calls(dg_logits), bp.time_graph(dg_logits, calls)
            bp.line(f"DeepGEMM fp8_paged_mqa_logits {shape} (same process) (per call)", us, key_bytes)
            bp.line(f"DeepGEMM fp8_paged_mqa_logits {shape} (same process) (graph)", gus, key_bytes)
            bp.emit("deep_gemm.fp8_paged_mqa_logits", f"{shape} engines' paged fp8 layout", us, gus, key_bytes)

        # The fused decode selection (logits stay in the workspace) against DeepGEMM + SGLang's top-k.
        sel = torch.empty(batch, K, dtype=torch.int32, device="cuda")
        workspace = torch.empty(keysel.paged_topk_workspace_bytes(batch, N), dtype=torch.uint8, device="cuda")

        def ks_fused(i):
            keysel.select_topk_paged(q, caches[i % copies], weights, context_lens, table, K, n_keys=N, out=sel,
                                     workspace=workspace)

        if deep_gemm is not None and not PROFILE:
            ks_fused(0)
            torch.cuda.synchronize()
            want = [set(torch.topk(ref[b], K).indices.tolist()) for b in range(min(batch, 2))]
            print(f"# check keysel select_topk_paged {shape}: indices outside torch.topk of DeepGEMM's logits: "
                  f"{set_misses(sel[:2].cpu(), want)} of {K} (near-ties of two fp32 logits may differ)", flush=True)
        if PROFILE:
            for i in range(3 if "fused" in PROFILE_ROWS else 0):
                ks_fused(i)
            del caches
            torch.cuda.empty_cache()
            continue
        us, gus = bp.time_calls(ks_fused), bp.time_graph(ks_fused, calls)
        bp.line(f"keysel select_topk_paged k={K} {shape} (per call)", us, key_bytes)
        bp.line(f"keysel select_topk_paged k={K} {shape} (graph)", gus, key_bytes)
        bp.emit("keysel.select_topk_paged", f"k={K} {shape}", us, gus, key_bytes)
        if deep_gemm is not None and sglang_topk is not None:
            idx = torch.empty(batch, K, dtype=torch.int32, device="cuda")
            lengths = torch.full((batch,), N, dtype=torch.int32, device="cuda")

            def chain(i):
                logits = deep_gemm.fp8_paged_mqa_logits(q, caches[i % copies], weights, context_lens, table, meta, N,
                                                        False)
                sglang_topk.fast_topk(logits, idx, lengths)

            us, gus = bp.time_calls(chain), bp.time_graph(chain, calls)
            bp.line(f"DeepGEMM paged logits + SGLang fast_topk k={K} {shape} (per call)", us, key_bytes)
            bp.line(f"DeepGEMM paged logits + SGLang fast_topk k={K} {shape} (graph)", gus, key_bytes)
            bp.emit("deep_gemm+sglang.chain", f"k={K} {shape}", us, gus, key_bytes)
        del caches
        torch.cuda.empty_cache()


def topk_decode():
    for dist in ("uniform", "normal"):
        for batch in BATCHES:
            scores = (torch.rand(batch, N, device="cuda") * 10.0 if dist == "uniform"
                      else torch.randn(batch, N, device="cuda"))
            lengths = torch.tensor([N if batch == 1 else N - (b * 977) % (N // 4 + 1) for b in range(batch)],
                                   dtype=torch.int32, device="cuda")
            out = torch.empty(batch, K, dtype=torch.int32, device="cuda")
            workspace = torch.empty(keysel.topk_rows_workspace_bytes(batch, N), dtype=torch.uint8, device="cuda")

            def ks(i):
                keysel.topk_rows(scores, K, lengths=lengths, out=out, workspace=workspace)

            if PROFILE:
                for i in range(3 if "topk" in PROFILE_ROWS and dist == "normal" else 0):
                    ks(i)
                continue
            ks(0)
            compat = ks_sglang.fast_topk_v2(scores, lengths, K)
            torch.cuda.synchronize()
            rows = sorted({0, batch - 1})
            want = [set(torch.topk(scores[b, :int(lengths[b])], K).indices.tolist()) for b in rows]
            misses = set_misses(out[rows].cpu(), want)
            misses_compat = set_misses(compat[rows].cpu(), want)
            print(f"# check keysel topk_rows {dist} B={batch}: indices outside torch.topk's set: {misses} of {K}; "
                  f"compat fast_topk_v2: {misses_compat}", flush=True)
            shape = f"k={K} B={batch} N={N}" + (" (lengths N..3N/4)" if batch > 1 else "") + f" {dist}"
            score_bytes = batch * N * 4
            us, gus = bp.time_calls(ks), bp.time_graph(ks, 10)
            bp.line(f"keysel topk_rows {shape} (per call)", us, score_bytes)
            bp.line(f"keysel topk_rows {shape} (graph)", gus, score_bytes)
            bp.emit("keysel.topk_rows", shape, us, gus, score_bytes, check=("indices_not_in_torch_topk", misses))
            if sglang_topk is not None:
                idx = torch.empty(batch, K, dtype=torch.int32, device="cuda")
                call = lambda i: sglang_topk.fast_topk(scores, idx, lengths)  # noqa: E731
                call(0)
                torch.cuda.synchronize()
                sg = set_misses(idx[rows].cpu(), want)
                us, gus = bp.time_calls(call), bp.time_graph(call, 10)
                bp.line(f"SGLang fast_topk {shape} (per call)", us, score_bytes)
                bp.line(f"SGLang fast_topk {shape} (graph)", gus, score_bytes)
                bp.emit("sglang.fast_topk", shape, us, gus, score_bytes, check=("indices_not_in_torch_topk", sg))
            del scores


def topk_prefill():
    """Prefill top-k: 8192 rows of ragged (causal) lengths up to 8192, and 1024 rows of 131072, against torch.topk."""
    for rows, width in ((8192, 8192), (1024, N)):
        scores = torch.randn(rows, width, device="cuda")
        if rows == width:
            ends = torch.arange(1, rows + 1, dtype=torch.int32, device="cuda")
        else:
            ends = torch.full((rows,), width, dtype=torch.int32, device="cuda")
        starts = torch.zeros(rows, dtype=torch.int32, device="cuda")
        out = torch.empty(rows, K, dtype=torch.int32, device="cuda")

        def ks(i):
            keysel.topk_rows(scores, K, starts=starts, ends=ends, out=out)

        masked = scores.masked_fill(torch.arange(width, device="cuda")[None, :] >= ends[:, None].long(), float("-inf"))
        torch_call = lambda i: torch.topk(masked, K, dim=-1)  # noqa: E731
        ks(0)
        torch.cuda.synchronize()
        row = rows - 1
        miss = set_misses(out[row:row + 1].cpu(), [set(torch.topk(scores[row, :int(ends[row])], K).indices.tolist())])
        shape = f"k={K} R={rows} L={width}" + (" causal lengths 1..L" if rows == width else "")
        nbytes = 4 * int(ends.long().sum())
        us, gus = bp.time_calls(ks, iters=3), bp.time_graph(ks, 3)
        bp.line(f"keysel topk_rows {shape} (per call)", us, nbytes)
        bp.line(f"keysel topk_rows {shape} (graph)", gus, nbytes)
        bp.emit("keysel.topk_rows prefill", shape, us, gus, nbytes, check=("indices_not_in_torch_topk", miss))
        us, gus = bp.time_calls(torch_call, iters=3), bp.time_graph(torch_call, 3)
        bp.line(f"torch.topk {shape} (masked rows) (per call)", us, nbytes)
        bp.line(f"torch.topk {shape} (masked rows) (graph)", gus, nbytes)
        bp.emit("torch.topk prefill", shape, us, gus, nbytes)
        del scores, masked


def indexer_prefill():
    """Prefill logits on DeepGEMM fp8_mqa_logits' shape (1024 query rows, the last 1024 of 8192 causal keys):
    keysel.compat.deep_gemm.fp8_mqa_logits (keysel's ragged CUDA path over the same contiguous keys), keysel's
    indexer_logits_cuda over the same keys as pages, and DeepGEMM's fp8_mqa_logits, all on the same inputs."""
    rows, n = 1024, 8192
    q = bp.random_fp8_bytes((rows, HEADS, DIM)).view(torch.float8_e4m3fn)
    kv = bp.random_fp8_bytes((n, DIM)).view(torch.float8_e4m3fn)
    scale = torch.rand(n, device="cuda", dtype=torch.float32) * 0.015 + 0.005
    weights = torch.rand(rows, HEADS, device="cuda", dtype=torch.float32) * 0.1
    pages = torch.cat([kv.view(torch.uint8).view(n // BLOCK, BLOCK * DIM),
                       scale.view(torch.uint8).view(n // BLOCK, BLOCK * 4)], dim=1).contiguous()
    positions = torch.arange(n - rows, n, dtype=torch.int32, device="cuda")
    seq = torch.zeros(rows, dtype=torch.int32, device="cuda")
    starts = torch.zeros(rows, dtype=torch.int32, device="cuda")
    ends = positions + 1
    out = torch.empty(rows, n, device="cuda")
    flops = float(positions.double().add(1).sum().item()) * HEADS * DIM * 2
    shape = f"R={rows} N={n} HI={HEADS} DI={DIM}"

    def ks_pages(i):
        keysel.indexer_logits_cuda(q, weights, pages, positions, n, sequence_of_row=seq, out=out)

    def ks_compat(i):
        return ks_deep_gemm.fp8_mqa_logits(q, (kv, scale), weights, starts, ends, True)

    if PROFILE:
        for i in range(3):
            if "prefill" in PROFILE_ROWS:
                ks_compat(i)
            if "prefill_pages" in PROFILE_ROWS:
                ks_pages(i)
        return
    checks = {}
    ref = None
    if deep_gemm is not None:
        ref = deep_gemm.fp8_mqa_logits(q, (kv, scale), weights, starts, ends, True)
    else:  # the float32 reference of the last row (every key) where DeepGEMM is missing
        r = rows - 1
        last = (torch.relu(q[r].float() @ kv.float().T) * weights[r][:, None]).sum(0) * scale
    ks_pages(0)
    compat = ks_compat(0)
    torch.cuda.synchronize()
    masked_ok = bool(torch.isneginf(compat[0, int(ends[0]):]).all().item())
    for name, got in (("compat", compat), ("pages", out)):
        err = rel(got, ref) if ref is not None else rel(got[rows - 1], last)
        checks[name] = ("rel_err_vs_deep_gemm" if ref is not None else "rel_err_fp32_last_row", err)
    same_inf = bool((torch.isneginf(compat) == torch.isneginf(ref)).all().item()) if ref is not None else None
    print(f"# check keysel prefill logits {shape} causal: compat.deep_gemm.fp8_mqa_logits rel err "
          f"{checks['compat'][1]:.2e} ({checks['compat'][0]}), indexer_logits_cuda over pages "
          f"{checks['pages'][1]:.2e}; -inf above the diagonal: {masked_ok}; -inf where DeepGEMM's is: {same_inf}",
          flush=True)
    runs = [("keysel compat.deep_gemm.fp8_mqa_logits (ragged CUDA path)", "keysel.compat.deep_gemm.fp8_mqa_logits",
             ks_compat, checks["compat"]),
            ("keysel indexer_logits_cuda (pages)", "keysel.indexer_logits_cuda prefill", ks_pages, checks["pages"])]
    if deep_gemm is not None:
        runs.append(("DeepGEMM fp8_mqa_logits (same process)", "deep_gemm.fp8_mqa_logits",
                     lambda i: deep_gemm.fp8_mqa_logits(q, (kv, scale), weights, starts, ends, True), None))
    for who, op, fn, check in runs:
        us = bp.time_calls(fn, iters=5)
        bp.line(f"{who} prefill {shape} clean_logits=1 (causal MMA flops)", us, flops, "flops")
        bp.emit(op, f"{shape} causal clean_logits=1", us, None, flops=flops, check=check)


def mla_decode():
    """keysel.sparse_mla (and keysel.compat.flash_mla) beside FlashMLA's sparse decode on the peer's shape: B=64,
    topk 2048 of 16384 tokens a sequence, fp8 V3.2 cache, h_q 128 and 64; FlashMLA timed in the same process."""
    from keysel.compat import flash_mla as ks_flash_mla

    for batch in (64, 1):
        topk, seq, block, d_qk, d_v = 2048, 16384, 64, 576, 512
        blocks_per_seq = seq // block
        num_blocks = batch * blocks_per_seq
        cache = bp.make_v32_cache(num_blocks, block)  # fp8 [num_blocks, 64, 1, 656]
        pages = cache.view(torch.uint8).view(num_blocks, block, 656)
        table = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
        pos = torch.argsort(torch.rand(batch, seq, device="cuda"), dim=1)[:, :topk].sort(dim=1).values.int()
        indices = (table.gather(1, (pos // block).long()) * block + pos % block).int().view(batch, 1, topk)
        flat_idx = indices.view(batch, topk)
        scale = d_qk ** -0.5
        for h_q in (128, 64):
            q = (torch.randn(batch, 1, h_q, d_qk, device="cuda") * 0.5).to(torch.bfloat16)
            q3 = q.view(batch, h_q, d_qk)
            out = torch.empty(batch, h_q, d_v, dtype=torch.bfloat16, device="cuda")
            lse = torch.empty(batch, h_q, device="cuda")
            top = torch.empty(batch, h_q, device="cuda")
            ws = torch.empty(max(16, keysel.sparse_mla_workspace_bytes(batch, h_q, topk)), dtype=torch.uint8,
                             device="cuda")

            def ks(i):
                keysel.sparse_mla(q3, pages, flat_idx, scale=scale, out=out, lse=lse, max_logits=top, workspace=ws)

            check = None
            if flash_mla is not None:
                meta, _ = flash_mla.get_mla_metadata()
                ref_out, ref_lse = flash_mla.flash_mla_with_kvcache(q, cache, None, None, d_v, meta, None, scale,
                                                                    False, True, indices)
                ks(0)
                kmeta, _ = ks_flash_mla.get_mla_metadata()
                c_out, c_lse = ks_flash_mla.flash_mla_with_kvcache(q, cache, None, None, d_v, kmeta, None, scale,
                                                                   False, True, indices)
                torch.cuda.synchronize()
                check = ("rel_err_vs_flash_mla", rel(out, ref_out.view(batch, h_q, d_v)))
                lse_err = (lse - ref_lse.view(batch, h_q)).abs().max().item()
                compat_err = rel(c_out, ref_out)
                print(f"# check keysel sparse_mla decode B={batch} h_q={h_q} vs FlashMLA: out rel err {check[1]:.2e},"
                      f" lse max abs err {lse_err:.2e}; compat.flash_mla out rel err {compat_err:.2e}", flush=True)

                def fm(i):
                    return flash_mla.flash_mla_with_kvcache(q, cache, None, None, d_v, meta, None, scale, False,
                                                            True, indices)
            kv_bytes = batch * topk * 656
            flops = 2.0 * batch * h_q * topk * (d_qk + d_v)
            shape = f"B={batch} h_q={h_q} d_qk={d_qk} d_v={d_v} topk={topk} fp8 V3.2 KV"
            for who, fn in (("keysel sparse_mla", ks),) + ((("FlashMLA (same process)", fm),) if flash_mla else ()):
                us = bp.time_calls(fn, iters=10)
                gus = bp.time_graph(fn, 4)
                bp.line(f"{who} decode {shape} (per call)", us, flops, "flops")
                bp.line(f"{who} decode {shape} (graph, KV bytes)", gus, kv_bytes)
                bp.emit(f"{who}.decode", shape, us, gus, kv_bytes, flops, check if who.startswith("keysel") else None)
            del q, out
        del cache, pages


def mla_prefill():
    """keysel.sparse_mla beside flash_mla_sparse_fwd on the peer's prefill shape (bf16 latents)."""
    s_q, s_kv, h_q, d_qk, d_v, topk = 1024, 32768, 128, 576, 512, 2048
    q = (torch.randn(s_q, h_q, d_qk, device="cuda") * 0.5).to(torch.bfloat16)
    kv = (torch.randn(s_kv, 1, d_qk, device="cuda") * 0.5).to(torch.bfloat16)
    indices = torch.argsort(torch.rand(s_q, s_kv, device="cuda"), dim=1)[:, :topk].int().view(s_q, 1, topk)
    scale = d_qk ** -0.5
    out = torch.empty(s_q, h_q, d_v, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(s_q, h_q, device="cuda")
    mx = torch.empty(s_q, h_q, device="cuda")

    def ks(i):
        keysel.sparse_mla(q, kv[:, 0, :], indices[:, 0, :], scale=scale, out=out, lse=lse, max_logits=mx)

    check = None
    flops = 2.0 * s_q * h_q * topk * (d_qk + d_v)
    runs = [("keysel sparse_mla", ks)]
    if flash_mla is not None:
        ref_out, ref_max, ref_lse = flash_mla.flash_mla_sparse_fwd(q, kv, indices, scale, d_v)
        ks(0)
        torch.cuda.synchronize()
        check = ("rel_err_vs_flash_mla", rel(out, ref_out))
        print(f"# check keysel sparse_mla prefill vs FlashMLA: out rel err {check[1]:.2e}, lse max abs err "
              f"{(lse - ref_lse).abs().max().item():.2e}, max_logits max abs err "
              f"{(mx - ref_max).abs().max().item():.2e}", flush=True)
        runs.append(("FlashMLA (same process)", lambda i: flash_mla.flash_mla_sparse_fwd(q, kv, indices, scale, d_v)))
    for who, fn in runs:
        us = bp.time_calls(fn, iters=5)
        bp.line(f"{who} prefill s_q={s_q} s_kv={s_kv} h_q={h_q} topk={topk} bf16 (per call)", us, flops, "flops")
        bp.emit(f"{who}.prefill", f"s_q={s_q} s_kv={s_kv} h_q={h_q} d_qk={d_qk} d_v={d_v} topk={topk} bf16", us,
                None, flops=flops, check=check if who.startswith("keysel") else None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--only", default="copy,decode,topk,prefill_topk,prefill,mla_decode,mla_prefill")
    ap.add_argument("--profile", default="",
                    help="comma list of paged, fused, topk, prefill (compat.deep_gemm), prefill_pages: run only those keysel calls, three times each, "
                         "untimed (for Nsight Compute, bench/gpu/dsa_profile.sh)")
    ap.add_argument("--batches", default="1,64", help="decode batch sizes (paged logits, fused, topk_rows)")
    args = ap.parse_args()
    global PROFILE, PROFILE_ROWS, BATCHES
    PROFILE = bool(args.profile)
    PROFILE_ROWS = set(args.profile.split(",")) - {""}
    BATCHES = tuple(int(b) for b in args.batches.split(","))
    bp.JSON_FILE = args.json
    bp.GPU = torch.cuda.get_device_name()
    stages = {"copy": getattr(bp, "bench_copy", None), "decode": indexer_decode, "topk": topk_decode, "prefill_topk": topk_prefill,
              "prefill": indexer_prefill, "mla_decode": mla_decode, "mla_prefill": mla_prefill}
    for name in args.only.split(","):
        try:
            stages[name]()
        except Exception:  # noqa: BLE001
            import traceback

            print(f"# stage {name} FAILED", flush=True)
            traceback.print_exc()


if __name__ == "__main__":
    main()
