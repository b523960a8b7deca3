"""
keysel's compiled core: the C++ library bound as it is. Use the functions of the keysel package.
"""

from collections.abc import Callable, Sequence


class Error(ValueError):
    pass

def built_with_cuda() -> bool:
    """True when keysel was built with its CUDA kernels."""

def built_with_faiss() -> bool:
    """True when keysel was built with the FAISS candidate searches."""

def cuda_device_count() -> int:
    """CUDA devices visible (0 without CUDA support or a GPU)."""

def num_threads() -> int:
    """Threads keysel's CPU code uses."""

def set_num_threads(threads: int) -> None:
    """Sets the threads keysel's CPU code uses (0: default)."""

def simd_level() -> str:
    """
    The instruction set keysel's CPU kernels use: "scalar", "avx2" or "avx512".
    """

def set_simd_level(level: str) -> None:
    """
    Forces a lower instruction set ("scalar", "avx2", "avx512") for the CPU kernels.
    """

def group_count(granularity: str, query_heads: int, kv_heads: int) -> int: ...

def selection_width(k: int, n_sink: int, n_local: int, kept_on_top: bool, function: str) -> int:
    """
    Checks a selection policy (keysel::Error naming the argument) and returns its width W.
    """

def metric_names() -> list[str]: ...

def aggregate(values: Sequence[float]) -> dict:
    """
    mean, min, p5, p50, p95 and count of values (NaN left out), as studies report them.
    """

def select_topk(scores: object, positions: object, k: int, n_sink: int, n_local: int, kept_on_top: bool, out: object, stream: int, workspace: object | None) -> None: ...

def select_topk_workspace_bytes(tokens: int, groups: int, n: int) -> int:
    """
    Device bytes select_topk may use on CUDA for scores [T, G, N] (an upper bound for every GPU).
    """

def indexer_topk_workspace_bytes(rows: int, n_keys: int) -> int:
    """Device bytes indexer_topk_cuda may use for R rows of n_keys keys."""

def exact_topk(q: object, k_cache: object, positions: object, k: int, granularity: str, scale: float, n_sink: int, n_local: int, kept_on_top: bool, out: object) -> None: ...

def indexer_scores(q_index: object, q_dtype: str, weights: object, k_index: object, k_dtype: str, positions: object, out: object) -> None: ...

def indexer_logits_cuda(q_index: object, q_dtype: str, weights: object, blocks: object, blocks_dtype: str, block_table: object | None, positions: object, sequence_of_row: object | None, out: object, stream: int) -> None: ...

def indexer_topk_cuda(q_index: object, q_dtype: str, weights: object, blocks: object, blocks_dtype: str, block_table: object | None, positions: object, n_keys: int, k: int, n_sink: int, n_local: int, kept_on_top: bool, sequence_of_row: object | None, out: object, stream: int, workspace: object | None) -> None: ...

def topk_rows(logits: object, starts: object | None, ends: object | None, lengths: object | None, next_n: int, k: int, out: object, stream: int, workspace: object | None) -> None: ...

def topk_rows_workspace_bytes(rows: int, n: int) -> int:
    """Device bytes topk_rows may use on CUDA for R rows of L logits."""

def paged_mqa_logits(q: object, q_dtype: str, weights: object, kv_cache: object, kv_cache_dtype: str, block_table: object, context_lens: object, out: object, stream: int) -> None: ...

def ragged_mqa_logits(q: object, q_dtype: str, weights: object, k_fp8: object, k_fp8_dtype: str, k_scale: object, starts: object, ends: object, out: object, stream: int) -> None: ...

def paged_mqa_topk(q: object, q_dtype: str, weights: object, kv_cache: object, kv_cache_dtype: str, block_table: object, context_lens: object, n_keys: int, k: int, out: object, stream: int, workspace: object | None) -> None: ...

def indexer_k_quant_and_cache(k: object, kv_cache: object, kv_cache_dtype: str, slot_mapping: object, power_of_two_scale: bool) -> None: ...

def sparse_attention(q: object, k_cache: object, v_cache: object, selection: object, granularity: str, scale: float, block_table: object | None, out: object, lse: object | None, stream: int) -> None: ...

def sparse_attention_backward(q: object, k_cache: object, v_cache: object, selection: object, granularity: str, scale: float, out: object, lse: object, grad_out: object, grad_q: object, grad_k: object, grad_v: object, stream: int = 0, grad_lse: object | None = None, deterministic: bool = True) -> None:
    """
    Gradients of sparse_attention (SPEC §9) into the float32 tensors grad_q [T, Hq, D], grad_k [N, Hkv, D] and grad_v [N, Hkv, Dv], given the forward's out and lse, grad_out and optionally grad_lse; CPU or CUDA, deterministic unless deterministic=False lets CUDA tensors take the tiled kernel.
    """

def sparse_attention_prefill(q: object, k_cache: object, v_cache: object, selection: object, granularity: str, scale: float, out: object, lse: object | None, stream: int) -> None:
    """
    The tiled tensor-core forward of attention over a selection for one sequence on a GPU (bf16 CUDA tensors).
    """

def sparse_attention_prefill_supported(q: object, k_cache: object, v_cache: object, selection: object, granularity: str) -> bool:
    """
    Whether sparse_attention_prefill takes these tensors (False where it would raise keysel.Error).
    """

def indexer_kl_loss_reference(target: object, queries: object, weights: object, keys: object, positions: object, selection: object | None, reduction: str, grad_queries: object, grad_weights: object, grad_keys: object) -> float:
    """
    The Lightning Indexer's KL loss (SPEC §9.1) in double precision; writes its gradients with respect to queries, weights and keys into the given float64 arrays and returns the loss.
    """

def sparse_mla(q: object, kv: object, kv_dtype: str, indices: object, out: object, lse: object | None, max_logits: object | None, scale: float, attn_sink: object | None, topk_length: object | None, stream: int, workspace: object | None) -> None: ...

def sparse_mla_backward(q: object, kv: object, indices: object, out: object, lse: object, grad_out: object, grad_lse: object | None, scale: float, attn_sink: object | None, topk_length: object | None, grad_q: object, grad_kv: object, grad_attn_sink: object | None, stream: int = 0) -> None:
    """
    Gradients of sparse_mla (SPEC §9.2) into the float32 tensors grad_q [T, h_q, 576], grad_kv [N, 576] and grad_attn_sink [h_q] (or None); CPU or CUDA, deterministic.
    """

def mla_v32_quantize(kv: object, cache: object, cache_dtype: str, slot_mapping: object) -> None: ...

def sparse_mla_workspace_bytes(rows: int, heads: int, topk: int, device: int = 0) -> int: ...

def select_topk_context_parallel(size: int, rank: int, all_gather: Callable, local_scores: object, local_positions: object, positions: object, n_keys: int, k: int, n_sink: int, n_local: int, kept_on_top: bool, exchange: str, out: object) -> dict: ...

def sparse_attention_context_parallel(size: int, rank: int, all_gather: Callable, q: object, k_cache: object, v_cache: object, local_positions: object, positions: object, n_keys: int, selection: object, granularity: str, scale: float, out: object, lse: object | None) -> dict: ...

def metrics(q: object, k_cache: object, v_cache: object | None, positions: object, selection: object, k: int, granularity: str, scale: float) -> dict[str, list[float]]: ...

class IndexerKeyCache:
    def __init__(self, dim: int, format: str, scale: str, group_size: int, power_of_two_scales: bool, hadamard: bool) -> None: ...

    def append(self, keys: object, keys_dtype: str) -> None: ...

    def scores(self, q_index: object, q_dtype: str, weights: object, positions: object, out: object) -> None: ...

    def select(self, q_index: object, q_dtype: str, weights: object, positions: object, k: int, n_sink: int, n_local: int, kept_on_top: bool, out: object) -> dict: ...

    def clear(self) -> None: ...

    @property
    def size(self) -> int: ...

    @property
    def dim(self) -> int: ...

    @property
    def bytes_per_token(self) -> int: ...

    @property
    def config(self) -> str: ...

class Selector:
    @property
    def name(self) -> str: ...

    def select(self, q: object, k_cache: object, positions: object, k: int, granularity: str, scale: float, n_sink: int, n_local: int, kept_on_top: bool, q_index: object | None, weights: object | None, cache: str, unchanged_keys: int, out: object) -> dict: ...

def make_selector(spec_json: str, q_index: object | None, k_index: object | None, weights: object | None) -> Selector: ...

def selector_spec_types() -> list[str]: ...

def load_dump(path: str) -> dict: ...

def tensor_view_info(tensor: object, dtype: str = '') -> dict:
    """
    The keysel::TensorView a tensor becomes (data pointer, dtype, shape, strides in elements, device).
    """

def run_study(config_text: str, config_path: str, out: str) -> str: ...
