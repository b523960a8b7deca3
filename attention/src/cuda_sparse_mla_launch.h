// Launch parameters of the sparse MLA kernels, filled by the checks in cuda_sparse_mla.cpp for the launch in
// cuda_sparse_mla.cu.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace keysel::cuda_kernels {

struct SparseMlaLaunch {
  const void* q;                     // bf16 [rows, heads, 576], contiguous
  const std::uint8_t* kv;            // V3.2 pages (656 bytes a token) or bf16 rows of 576
  bool v32;                          // the fp8 V3.2 layout
  std::int64_t kv_stride;            // bytes from one page (V3.2) or one bf16 row to the next
  int page_size;                     // tokens a page (V3.2)
  std::int64_t slots;                // valid slots are [0, slots)
  const std::int32_t* indices;       // [rows, topk], row stride index_stride
  std::int64_t index_stride;
  int topk;
  const std::int32_t* topk_length;   // [rows] or nullptr
  const float* attn_sink;            // [heads] or nullptr
  void* out;                         // [rows, heads, 512], fp32 or bf16, contiguous
  bool out_bf16;
  float* lse;                        // [rows, heads] natural log, or nullptr
  float* max_logits;                 // [rows, heads], or nullptr
  int rows, heads;
  float scale;
  int multiprocessors;
  int device;
  void* workspace;                   // caller's memory of sparse_mla_workspace_bytes, or nullptr (keysel's pool)
};

/// Bytes of scratch the launch needs for these sizes on a GPU with `multiprocessors` SMs (0: none).
std::size_t sparse_mla_workspace_bytes(int rows, int heads, int topk, int multiprocessors, int device);

/// Whether calls on `device` with the fp8 V3.2 cache (`v32`) or the bf16 latent cache can take the sm_90a
/// warpgroup-MMA kernel (KEYSEL_MLA_KERNEL=wgmma or unset, h_q a multiple of 64): this binary has its sm_90a code
/// and the device grants its shared memory (194 KiB with the V3.2 cache, 224 KiB with the bf16 one).
bool sparse_mla_wgmma_kernel_available(int device, bool v32 = true);

/// Launches on `stream` (a cudaStream_t); throws keysel::Error of `function` when CUDA refuses.
void launch_sparse_mla(std::string_view function, const SparseMlaLaunch& launch, void* stream);

}  // namespace keysel::cuda_kernels
