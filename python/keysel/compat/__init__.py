"""keysel.compat: drop-in replacements for the selection half of DeepSeek-V3.2 sparse attention as the engines
run it (issue 15; docs/compat.md, docs/SPEC.md §7).

    from keysel.compat import deep_gemm     # fp8_mqa_logits, fp8_paged_mqa_logits, get_paged_mqa_logits_metadata
    from keysel.compat import vllm          # indexer_k_quant_and_cache, cp_gather_indexer_k_quant_cache,
                                            # top_k_per_row_prefill, top_k_per_row_decode
    from keysel.compat import sglang        # fast_topk_v2, fast_topk_transform_fused,
                                            # fast_topk_transform_ragged_fused
    from keysel.compat import flashinfer    # top_k, top_k_page_table_transform, top_k_ragged_transform
    from keysel.compat import flash_mla     # get_mla_metadata, flash_mla_with_kvcache, flash_mla_sparse_fwd
                                            # (the MLA attention over the selected keys, issue 16)

Each function has its peer's name, argument order, defaults, shapes, dtypes and in-place / returned outputs.
All of them route the heavy work through keysel.compat._ops (ragged_logits, paged_logits, topk_rows,
quant_and_cache) or, for flash_mla and vllm.concat_and_cache_mla, keysel.compat._mla (sparse_mla, dense_mla,
write_v32): torch code today that runs on CPU and CUDA tensors without host synchronisation (CUDA-graph
capturable), to be replaced by keysel CUDA kernels with the same contracts. Top-k is exact and deterministic:
equal values prefer the lower position, NaN ranks lowest, the chosen positions come out ascending, then -1.
Bad arguments raise keysel.Error (a ValueError) naming the argument, and nothing is written.

The submodules import torch; ``import keysel.compat`` alone does not.
"""

__all__ = ["deep_gemm", "flash_mla", "flashinfer", "sglang", "vllm"]


def __getattr__(name):
    if name in __all__:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
