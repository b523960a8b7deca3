"""keysel.distributed over real torch.distributed processes (gloo, CPU): every rank of 3 gets select_topk's
selection of the whole rows, bit for bit, with both exchanges."""

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
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout,exchange", [("contiguous", "all_gather"), ("round_robin", "threshold")])
def test_every_rank_gets_the_single_process_selection(tmp_path, layout, exchange):
    import torch.multiprocessing as mp

    mp.start_processes(worker, args=(str(tmp_path / "rendezvous"), str(tmp_path), layout, exchange), nprocs=RANKS,
                       join=True, start_method="spawn")
    scores, positions = scores_and_positions()
    want = keysel.select_topk(scores, positions, 40, n_sink=2, n_local=3)
    for rank in range(RANKS):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{rank}.npy"), want)


def test_without_a_process_group_names_the_group():
    import keysel.distributed as kd

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(keysel.Error, match="group"):
        kd.select_topk_context_parallel(torch.zeros(1, 1, 4), torch.arange(4, dtype=torch.int32),
                                        torch.tensor([3], dtype=torch.int32), 4, 2)
