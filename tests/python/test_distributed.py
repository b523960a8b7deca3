"""keysel.distributed over real torch.distributed processes (gloo, CPU): every rank of 3 gets select_topk's
selection of the whole rows, bit for bit, with both exchanges, and sparse_attention's output on the whole cache
(within 2e-5) from attention over its shard merged by log-sum-exp."""

import os

import numpy as np
import pytest

import keysel

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this torch has no torch.distributed")

RANKS, T, G, N = 3, 6, 2, 257


def scores_and_positions():
    rng = np.random.default_rng(11)
    scores = (np.round(rng.standard_normal((T, G, N)) * 4) / 4).astype(np.float32)  # many ties
    scores[rng.random(scores.shape) < 0.03] = np.nan
    positions = np.array([N - 1, 0, 100, 200, 63, N - 1], np.int32)
    return scores, positions


HQ, HKV, D = 4, 2, 16


def attention_inputs():
    rng = np.random.default_rng(12)
    return (rng.standard_normal((T, HQ, D)).astype(np.float32), rng.standard_normal((N, HKV, D)).astype(np.float32),
            rng.standard_normal((N, HKV, D)).astype(np.float32))


def worker(rank, rendezvous, out_dir, layout, exchange):
    import keysel.distributed as kd

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=RANKS)
    try:
        scores, positions = scores_and_positions()
        mine = kd.shard_positions(rank, RANKS, N, layout=layout, page=16)
        local = np.ascontiguousarray(scores[:, :, mine])
        sel = kd.select_topk_context_parallel(torch.from_numpy(local), torch.from_numpy(mine),
                                              torch.from_numpy(positions), N, 40, n_sink=2, n_local=3,
                                              exchange=exchange)
        np.save(os.path.join(out_dir, f"rank{rank}.npy"), sel.numpy())
        q, k, v = attention_inputs()
        lse = torch.empty(T, HQ)
        out = kd.sparse_attention_context_parallel(torch.from_numpy(q), torch.from_numpy(np.ascontiguousarray(k[mine])),
                                                   torch.from_numpy(np.ascontiguousarray(v[mine])),
                                                   torch.from_numpy(mine), torch.from_numpy(positions), N, sel,
                                                   granularity="per_kv_head", lse=lse)
        np.save(os.path.join(out_dir, f"out{rank}.npy"), out.numpy())
        np.save(os.path.join(out_dir, f"lse{rank}.npy"), lse.numpy())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout,exchange", [("contiguous", "all_gather"), ("round_robin", "threshold")])
def test_every_rank_gets_the_single_process_selection(tmp_path, layout, exchange):
    import torch.multiprocessing as mp

    mp.start_processes(worker, args=(str(tmp_path / "rendezvous"), str(tmp_path), layout, exchange), nprocs=RANKS,
                       join=True, start_method="spawn")
    scores, positions = scores_and_positions()
    want = keysel.select_topk(scores, positions, 40, n_sink=2, n_local=3)
    q, k, v = attention_inputs()
    want_out = np.empty((T, HQ, D), np.float32)
    want_lse = np.empty((T, HQ), np.float32)
    keysel.sparse_attention(q, k, v, want, granularity="per_kv_head", out=want_out, lse=want_lse)
    assert np.isfinite(want_out).all() and np.abs(want_out).max() > 0.1  # a real output, not zeros
    for rank in range(RANKS):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{rank}.npy"), want)
        np.testing.assert_allclose(np.load(tmp_path / f"out{rank}.npy"), want_out, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(np.load(tmp_path / f"lse{rank}.npy"), want_lse, rtol=2e-5, atol=2e-5)


def test_without_a_process_group_names_the_group():
    import keysel.distributed as kd

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(keysel.Error, match="group"):
        kd.select_topk_context_parallel(torch.zeros(1, 1, 4), torch.arange(4, dtype=torch.int32),
                                        torch.tensor([3], dtype=torch.int32), 4, 2)
