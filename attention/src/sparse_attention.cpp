// sparse_attention and full_attention_fast: argument checks, query preparation, work split and the merge of
// partial softmax states. The per-ISA kernels are in sparse_attention_{scalar,avx2,avx512}.cpp.
#include "keysel/attention/sparse_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "keysel/core/checked.h"
#include "keysel/core/cpu_features.h"
#include "keysel/core/threads.h"
#include "sparse_attention_backward.h"
#include "sparse_attention_kernels.h"

namespace keysel {
namespace {

namespace kernels = attention_kernels;

/// Element count below which a preparatory loop runs on the calling thread.
constexpr std::int64_t kParallelWork = std::int64_t{1} << 18;

// ---- kernel choice ------------------------------------------------------------------------------------------
// The attention kernels are one per SIMD level (keysel/core/cpu_features.h): avx512 needs AVX-512 F/BW/VL/DQ (+ FMA,
// F16C), avx2 needs AVX2 + FMA + F16C. `automatic` is the level in use (simd_level(): the CPU's best, lowered by
// KEYSEL_SIMD or set_simd_level), so attention, the indexer and top-k always run at one level.

SimdLevel level_of(AttentionKernel kernel) {
  switch (kernel) {
    case AttentionKernel::avx512: return SimdLevel::avx512;
    case AttentionKernel::avx2: return SimdLevel::avx2;
    default: return SimdLevel::scalar;
  }
}

AttentionKernel kernel_of(SimdLevel level) {
#if defined(__x86_64__)
  switch (level) {
    case SimdLevel::avx512: return AttentionKernel::avx512;
    case SimdLevel::avx2: return AttentionKernel::avx2;
    case SimdLevel::scalar: break;
  }
#else
  (void)level;  // only the scalar kernel is built off x86-64
#endif
  return AttentionKernel::scalar;
}

bool cpu_runs(AttentionKernel kernel) {
  return kernel != AttentionKernel::automatic && kernel_of(level_of(kernel)) == kernel &&
         simd_level_supported(level_of(kernel));
}

AttentionKernel resolve_kernel(std::string_view function, AttentionKernel requested) {
  if (requested == AttentionKernel::automatic) return default_attention_kernel();
  if (!cpu_runs(requested)) {
    std::string available;
    for (const AttentionKernel k : available_attention_kernels()) {
      available += (available.empty() ? "" : ", ") + std::string(attention_kernel_name(k));
    }
    detail::throw_argument_error(function, "options.kernel", "a kernel this CPU runs (" + available + ")",
                                 std::string(attention_kernel_name(requested)));
  }
  return requested;
}

using KernelFunction = void (*)(const kernels::Problem&, const std::int32_t*, std::int64_t, const kernels::State&);

using SharedKernelFunction = void (*)(const kernels::Problem*, std::int64_t, const std::int32_t*, const std::int64_t*,
                                      const kernels::State*);

SharedKernelFunction shared_kernel_function(AttentionKernel kernel) {
  switch (kernel) {
#if defined(__x86_64__)
    case AttentionKernel::avx512: return kernels::attend_shared_avx512;
    case AttentionKernel::avx2: return kernels::attend_shared_avx2;
#endif
    default: return kernels::attend_shared_scalar;
  }
}

/// Query tokens attended together over the causal prefix (full attention): each block of K/V rows is read from
/// memory once for this many tokens of one key head.
constexpr std::int64_t kPrefixTile = 16;

KernelFunction kernel_function(AttentionKernel kernel) {
  switch (kernel) {
#if defined(__x86_64__)
    case AttentionKernel::avx512: return kernels::attend_avx512;
    case AttentionKernel::avx2: return kernels::attend_avx2;
#endif
    default: return kernels::attend_scalar;
  }
}

// ---- argument checks ---------------------------------------------------------------------------------------

void check_output(std::string_view function, const TensorView& view, std::string_view argument,
                  std::initializer_list<std::int64_t> shape) {
  expect_shape(function, view, argument, shape);
  expect_dtype(function, view, argument, {DType::fp32});
  expect_device(function, view, argument, Device::cpu());
  expect_writable(function, view, argument);
}

std::vector<std::int64_t> read_positions(const TensorView& positions) {
  std::vector<std::int64_t> values(static_cast<std::size_t>(positions.size(0)));
  const std::int32_t* data = positions.data<std::int32_t>();
  for (std::size_t t = 0; t < values.size(); ++t) values[t] = data[static_cast<std::int64_t>(t) * positions.stride(0)];
  return values;
}

/// Entry i of selection row (t, g).
inline std::int32_t selection_entry(const std::int32_t* data, const std::int64_t* strides, std::int64_t t,
                                    std::int64_t g, std::int64_t i) {
  return data[t * strides[0] + g * strides[1] + i * strides[2]];
}

/// The selection rules of validate_selection (core/selection.h) checked in parallel with a bitmap per thread
/// (validate_selection is the plain version; this one runs in the decode path). On a bad entry the first bad
/// row is re-checked by validate_selection's rules to throw the same message.
void check_selection(std::string_view function, const TensorView& selection, const TensorView& positions,
                     const std::vector<std::int64_t>& allowed, std::int64_t n_keys, std::int64_t groups) {
  expect_shape(function, selection, "selection", {positions.size(0), groups, kAnyExtent});
  expect_dtype(function, selection, "selection", {DType::int32});
  expect_device(function, selection, "selection", Device::cpu());
  KEYSEL_CHECK_ARG_IN(function, selection.size(2) >= 1, "selection", "a width W >= 1 (k = 0 selects nothing)",
                      selection.str());
  const std::int64_t tokens = selection.size(0);
  const std::int64_t width = selection.size(2);
  const std::int64_t strides[3] = {selection.stride(0), selection.stride(1), selection.stride(2)};
  const std::int32_t* data = selection.data<std::int32_t>();
  const std::int64_t rows = tokens * groups;
  std::int64_t first_bad = rows;
  // Small selections (decode) are checked on the calling thread: a parallel region costs more than the check.
#pragma omp parallel if (rows * width > kParallelWork)
  {
    std::vector<std::uint64_t> seen(static_cast<std::size_t>((n_keys + 63) / 64), 0);
    std::int64_t my_first_bad = rows;
#pragma omp for schedule(static)
    for (std::int64_t row = 0; row < rows; ++row) {
      const std::int64_t t = row / groups;
      const std::int64_t g = row % groups;
      const std::int64_t limit = allowed[static_cast<std::size_t>(t)];
      bool bad = false;
      bool padding = false;
      std::int64_t i = 0;
      for (; i < width; ++i) {
        const std::int64_t s = selection_entry(data, strides, t, g, i);
        if (s == -1) {
          padding = true;
          continue;
        }
        if (padding || s < 0 || s >= limit) {
          bad = true;
          break;
        }
        std::uint64_t& word = seen[static_cast<std::size_t>(s >> 6)];
        const std::uint64_t bit = std::uint64_t{1} << (s & 63);
        if (word & bit) {
          bad = true;
          break;
        }
        word |= bit;
      }
      for (std::int64_t j = 0; j < std::min(i, width); ++j) {  // clear what this row set
        const std::int64_t s = selection_entry(data, strides, t, g, j);
        if (s >= 0 && s < n_keys) seen[static_cast<std::size_t>(s >> 6)] = 0;
      }
      if (bad) my_first_bad = std::min(my_first_bad, row);
    }
#pragma omp critical(keysel_sparse_attention_check)
    first_bad = std::min(first_bad, my_first_bad);
  }
  if (first_bad == rows) return;

  // Reproduce the failure on that row to name the entry.
  const std::int64_t t = first_bad / groups;
  const std::int64_t g = first_bad % groups;
  const std::int64_t limit = allowed[static_cast<std::size_t>(t)];
  std::vector<char> seen(static_cast<std::size_t>(n_keys), 0);
  bool padding = false;
  for (std::int64_t i = 0; i < width; ++i) {
    const std::int64_t s = selection_entry(data, strides, t, g, i);
    const std::string where = "selection[" + std::to_string(t) + ", " + std::to_string(g) + ", " + std::to_string(i) + "]";
    if (s == -1) {
      padding = true;
      continue;
    }
    if (padding) {
      detail::throw_argument_error(function, "selection", "-1 padding only at the end of a row",
                                   where + " = " + std::to_string(s) + " after a -1");
    }
    if (s < 0 || s >= limit) {
      detail::throw_argument_error(function, "selection", "key positions in [0, " + std::to_string(limit) + ") or -1",
                                   where + " = " + std::to_string(s));
    }
    if (seen[static_cast<std::size_t>(s)]) {
      detail::throw_argument_error(function, "selection", "distinct key positions in each row",
                                   where + " = " + std::to_string(s) + " repeated");
    }
    seen[static_cast<std::size_t>(s)] = 1;
  }
  KEYSEL_ASSERT(false);
}

// ---- preparation -------------------------------------------------------------------------------------------

float load_as_float(const TensorView& view, const std::byte* base, std::int64_t offset) {
  switch (view.dtype()) {
    case DType::fp32: {
      float x;
      std::memcpy(&x, base + offset * 4, 4);
      return x;
    }
    case DType::bf16:
    case DType::fp16: {
      std::uint16_t bits;
      std::memcpy(&bits, base + offset * 2, 2);
      return view.dtype() == DType::bf16 ? bf16_bits_to_fp32(bits) : fp16_bits_to_fp32(bits);
    }
    default: break;
  }
  return 0.0f;
}

/// q as fp32 [T, Hq, dim_padded], multiplied by the scale (in double, rounded once), zero padded.
std::vector<float> prepare_queries(const TensorView& q, double scale, std::int64_t dim_padded) {
  const std::int64_t tokens = q.size(0), heads = q.size(1), dim = q.size(2);
  std::vector<float> out(static_cast<std::size_t>(tokens * heads * dim_padded), 0.0f);
  const auto* base = static_cast<const std::byte*>(q.raw_data());
#pragma omp parallel for collapse(2) schedule(static) if (tokens * heads * dim > kParallelWork)
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t h = 0; h < heads; ++h) {
      float* row = out.data() + (t * heads + h) * dim_padded;
      for (std::int64_t d = 0; d < dim; ++d) {
        const float x = load_as_float(q, base, t * q.stride(0) + h * q.stride(1) + d * q.stride(2));
        row[d] = static_cast<float>(scale * static_cast<double>(x));
      }
    }
  }
  return out;
}

/// K or V rows with contiguous channels: the view itself, or (for a view whose last stride is not 1) a
/// contiguous copy in the same dtype, kept in `storage`.
struct RowSource {
  const std::byte* base = nullptr;  // element (0, 0, 0)
  std::int64_t token_bytes = 0;     // between rows of consecutive tokens
  std::int64_t head_bytes = 0;      // between key heads of one token
};

RowSource row_source(const TensorView& view, std::vector<std::byte>& storage) {
  const std::int64_t element = dtype_bits(view.dtype()) / 8;
  if (view.stride(2) == 1 || view.size(2) == 1) {
    return {static_cast<const std::byte*>(view.raw_data()), view.stride(0) * element, view.stride(1) * element};
  }
  const std::int64_t n = view.size(0), heads = view.size(1), dim = view.size(2);
  storage.resize(static_cast<std::size_t>(n * heads * dim * element));
  const auto* src = static_cast<const std::byte*>(view.raw_data());
  for (std::int64_t s = 0; s < n; ++s) {
    for (std::int64_t h = 0; h < heads; ++h) {
      for (std::int64_t d = 0; d < dim; ++d) {
        std::memcpy(storage.data() + ((s * heads + h) * dim + d) * element,
                    src + (s * view.stride(0) + h * view.stride(1) + d * view.stride(2)) * element,
                    static_cast<std::size_t>(element));
      }
    }
  }
  return {storage.data(), heads * dim * element, dim * element};
}

// ---- the driver --------------------------------------------------------------------------------------------

/// Where the keys of unit `unit` come from: a selection (rows of W entries, -1 padded) or the causal prefix.
struct KeySource {
  const std::int32_t* selection = nullptr;  // null: all allowed keys (full attention)
  std::int64_t strides[3] = {0, 0, 0};
  std::int64_t width = 0;
  const std::int32_t* prefix = nullptr;     // 0, 1, ..., N-1 (full attention)
};

void run_attention(const AttentionInputs& inputs, const AttentionShape& shape,
                   const std::vector<std::int64_t>& allowed, const KeySource& source, Granularity granularity,
                   const TensorView& out, const TensorView& lse, const SparseAttentionOptions& options,
                   AttentionKernel kernel) {
  const KernelFunction attend = kernel_function(kernel);
  const int threads = options.threads > 0 ? options.threads : num_threads();
  const std::int64_t g = shape.group_size();
  const bool per_head = granularity == Granularity::per_head;
  const std::int64_t units_per_token = per_head ? shape.query_heads : shape.kv_heads;
  const std::int64_t heads_per_unit = per_head ? 1 : g;
  const std::int64_t units = shape.tokens * units_per_token;
  if (units == 0) return;  // no query tokens
  const std::int64_t dp = kernels::padded(shape.head_dim);
  const std::int64_t dvp = kernels::padded(shape.value_dim);

  const std::vector<float> queries = prepare_queries(inputs.q, inputs.effective_scale(), dp);
  std::vector<std::byte> k_storage, v_storage;
  const RowSource k_rows = row_source(inputs.k, k_storage);
  const RowSource v_rows = row_source(inputs.v, v_storage);

  // Fewer units than threads (decode with few key heads): split each unit's keys into ranges and merge them.
  std::int64_t max_keys = 0;
  for (const std::int64_t a : allowed) max_keys = std::max(max_keys, source.selection ? std::min(a, source.width) : a);
  std::int64_t splits = 1;
  if (units < threads) {
    splits = std::clamp<std::int64_t>((2 * threads + units - 1) / units, 1, std::max<std::int64_t>(1, max_keys / 256));
  }
  const std::int64_t items = units * splits;
  const std::int64_t state_floats = heads_per_unit * (2 + dvp);
  std::vector<float> partial(splits > 1 ? static_cast<std::size_t>(items * state_floats) : 0);

  float* out_data = out.mutable_data<float>();
  const std::int64_t os[3] = {out.stride(0), out.stride(1), out.stride(2)};
  float* lse_data = lse.empty() ? nullptr : lse.mutable_data<float>();
  const std::int64_t ls[2] = {lse.empty() ? 0 : lse.stride(0), lse.empty() ? 0 : lse.stride(1)};
  const float minus_inf = -std::numeric_limits<float>::infinity();

  // Writes the normalised output of one head from its state (max, sum, acc row).
  const auto finish_head = [&](std::int64_t t, std::int64_t h, float max, float sum, const float* acc) {
    const float inverse = sum > 0.0f ? 1.0f / sum : 0.0f;
    float* o = out_data + t * os[0] + h * os[1];
    for (std::int64_t d = 0; d < shape.value_dim; ++d) o[d * os[2]] = acc[d] * inverse;
    if (lse_data != nullptr) lse_data[t * ls[0] + h * ls[1]] = sum > 0.0f ? max + std::log(sum) : minus_inf;
  };

  // Full attention (every unit's keys are a prefix of 0, 1, ...): tiles of kPrefixTile consecutive tokens of one
  // key head share each block of K/V rows (attend_shared: the same result per unit as attend).
  if (source.selection == nullptr && splits == 1) {
    const SharedKernelFunction attend_shared = shared_kernel_function(kernel);
    const std::int64_t token_tiles = (shape.tokens + kPrefixTile - 1) / kPrefixTile;
    const std::int64_t tiles = token_tiles * units_per_token;
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> state_max(static_cast<std::size_t>(kPrefixTile * heads_per_unit));
      std::vector<float> state_sum(static_cast<std::size_t>(kPrefixTile * heads_per_unit));
      std::vector<float> state_acc(static_cast<std::size_t>(kPrefixTile * heads_per_unit * dvp));
      std::vector<float> logits(static_cast<std::size_t>(kPrefixTile * heads_per_unit * kernels::kBlock));
      kernels::Problem problems[kPrefixTile];
      kernels::State states[kPrefixTile];
      std::int64_t counts[kPrefixTile];
#pragma omp for schedule(dynamic, 1)
      for (std::int64_t tile = 0; tile < tiles; ++tile) {
        // The longest tiles (the last tokens) first, so that the short ones fill in at the end.
        const std::int64_t token_tile = token_tiles - 1 - tile / units_per_token;
        const std::int64_t u = tile % units_per_token;
        const std::int64_t first_head = per_head ? u : u * g;
        const std::int64_t kv = first_head / g;
        const std::int64_t t0 = token_tile * kPrefixTile;
        const std::int64_t m = std::min(kPrefixTile, shape.tokens - t0);
        for (std::int64_t i = 0; i < m; ++i) {
          const std::int64_t t = t0 + i;
          kernels::Problem& problem = problems[i];
          problem.q = queries.data() + (t * shape.query_heads + first_head) * dp;
          problem.heads = heads_per_unit;
          problem.dim = shape.head_dim;
          problem.dim_padded = dp;
          problem.value_dim = shape.value_dim;
          problem.value_dim_padded = dvp;
          problem.k_dtype = inputs.k.dtype();
          problem.v_dtype = inputs.v.dtype();
          problem.k = k_rows.base + kv * k_rows.head_bytes;
          problem.k_row_bytes = k_rows.token_bytes;
          problem.v = v_rows.base + kv * v_rows.head_bytes;
          problem.v_row_bytes = v_rows.token_bytes;
          counts[i] = allowed[static_cast<std::size_t>(t)];
          states[i] = kernels::State{state_max.data() + i * heads_per_unit, state_sum.data() + i * heads_per_unit,
                                     state_acc.data() + i * heads_per_unit * dvp,
                                     logits.data() + i * heads_per_unit * kernels::kBlock};
        }
        std::fill(state_max.begin(), state_max.end(), minus_inf);
        std::fill(state_sum.begin(), state_sum.end(), 0.0f);
        std::fill(state_acc.begin(), state_acc.end(), 0.0f);
        attend_shared(problems, m, source.prefix, counts, states);
        for (std::int64_t i = 0; i < m; ++i) {
          for (std::int64_t j = 0; j < heads_per_unit; ++j) {
            finish_head(t0 + i, first_head + j, states[i].max[j], states[i].sum[j], states[i].acc + j * dvp);
          }
        }
      }
    }
    return;
  }

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> state_max(static_cast<std::size_t>(heads_per_unit));
    std::vector<float> state_sum(static_cast<std::size_t>(heads_per_unit));
    std::vector<float> state_acc(static_cast<std::size_t>(heads_per_unit * dvp));
    std::vector<float> logits(static_cast<std::size_t>(heads_per_unit * kernels::kBlock));
    std::vector<std::int32_t> row_keys(static_cast<std::size_t>(source.width));
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t item = 0; item < items; ++item) {
      const std::int64_t unit = item / splits;
      const std::int64_t split = item % splits;
      const std::int64_t t = unit / units_per_token;
      const std::int64_t u = unit % units_per_token;
      const std::int64_t first_head = per_head ? u : u * g;
      const std::int64_t kv = first_head / g;
      const std::int64_t group =
          per_head ? u : (granularity == Granularity::per_kv_head ? u : 0);

      // The unit's keys.
      const std::int32_t* keys = nullptr;
      std::int64_t count = 0;
      if (source.selection == nullptr) {
        keys = source.prefix;
        count = allowed[static_cast<std::size_t>(t)];
      } else {
        const std::int32_t* row = source.selection + t * source.strides[0] + group * source.strides[1];
        const std::int64_t step = source.strides[2];
        if (step == 1) {
          while (count < source.width && row[count] >= 0) ++count;
          keys = row;
        } else {
          while (count < source.width && row[count * step] >= 0) {
            row_keys[static_cast<std::size_t>(count)] = row[count * step];
            ++count;
          }
          keys = row_keys.data();
        }
      }
      const std::int64_t begin = count * split / splits;
      const std::int64_t end = count * (split + 1) / splits;

      kernels::Problem problem;
      problem.q = queries.data() + (t * shape.query_heads + first_head) * dp;
      problem.heads = heads_per_unit;
      problem.dim = shape.head_dim;
      problem.dim_padded = dp;
      problem.value_dim = shape.value_dim;
      problem.value_dim_padded = dvp;
      problem.k_dtype = inputs.k.dtype();
      problem.v_dtype = inputs.v.dtype();
      problem.k = k_rows.base + kv * k_rows.head_bytes;
      problem.k_row_bytes = k_rows.token_bytes;
      problem.v = v_rows.base + kv * v_rows.head_bytes;
      problem.v_row_bytes = v_rows.token_bytes;

      std::fill(state_max.begin(), state_max.end(), minus_inf);
      std::fill(state_sum.begin(), state_sum.end(), 0.0f);
      std::fill(state_acc.begin(), state_acc.end(), 0.0f);
      const kernels::State state{state_max.data(), state_sum.data(), state_acc.data(), logits.data()};
      if (end > begin) attend(problem, keys + begin, end - begin, state);

      if (splits == 1) {
        for (std::int64_t i = 0; i < heads_per_unit; ++i) {
          finish_head(t, first_head + i, state_max[static_cast<std::size_t>(i)], state_sum[static_cast<std::size_t>(i)],
                      state_acc.data() + i * dvp);
        }
      } else {
        float* saved = partial.data() + item * state_floats;
        std::copy(state_max.begin(), state_max.end(), saved);
        std::copy(state_sum.begin(), state_sum.end(), saved + heads_per_unit);
        std::copy(state_acc.begin(), state_acc.end(), saved + 2 * heads_per_unit);
      }
    }
  }
  if (splits == 1) return;

  // Merge the key ranges of each unit: rescale every partial state to the overall max.
  std::vector<float> acc(static_cast<std::size_t>(dvp));
  for (std::int64_t unit = 0; unit < units; ++unit) {
    const std::int64_t t = unit / units_per_token;
    const std::int64_t u = unit % units_per_token;
    const std::int64_t first_head = per_head ? u : u * g;
    for (std::int64_t i = 0; i < heads_per_unit; ++i) {
      float max = minus_inf;
      for (std::int64_t split = 0; split < splits; ++split) {
        max = std::max(max, partial[static_cast<std::size_t>((unit * splits + split) * state_floats + i)]);
      }
      float sum = 0.0f;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (std::int64_t split = 0; split < splits; ++split) {
        const float* saved = partial.data() + (unit * splits + split) * state_floats;
        if (saved[heads_per_unit + i] == 0.0f) continue;  // an empty range
        const float factor = std::exp(saved[i] - max);
        sum += factor * saved[heads_per_unit + i];
        const float* part = saved + 2 * heads_per_unit + i * dvp;
        for (std::int64_t d = 0; d < dvp; ++d) acc[static_cast<std::size_t>(d)] += factor * part[d];
      }
      finish_head(t, first_head + i, max, sum, acc.data());
    }
  }
}

// ---- the backward pass -------------------------------------------------------------------------------------

kernels::BackwardOps backward_ops(AttentionKernel kernel) {
  switch (kernel) {
#if defined(__x86_64__)
    case AttentionKernel::avx512: return kernels::backward_ops_avx512();
    case AttentionKernel::avx2: return kernels::backward_ops_avx2();
#endif
    default: return kernels::backward_ops_scalar();
  }
}

void check_input(std::string_view function, const TensorView& view, std::string_view argument,
                 std::initializer_list<std::int64_t> shape, std::initializer_list<DType> dtypes) {
  expect_shape(function, view, argument, shape);
  expect_dtype(function, view, argument, dtypes);
  expect_device(function, view, argument, Device::cpu());
}

/// The work units of the forward (run_attention): unit (t, u) holds the query heads that share one key head and
/// one selection row.
struct UnitLayout {
  std::int64_t units_per_token = 0;
  std::int64_t heads_per_unit = 0;
  std::int64_t group_size = 0;  // g
  Granularity granularity = Granularity::per_kv_head;

  UnitLayout(const AttentionShape& shape, Granularity granularity_in)
      : group_size(shape.group_size()), granularity(granularity_in) {
    const bool per_head = granularity == Granularity::per_head;
    units_per_token = per_head ? shape.query_heads : shape.kv_heads;
    heads_per_unit = per_head ? 1 : group_size;
  }
  std::int64_t first_head(std::int64_t u) const { return granularity == Granularity::per_head ? u : u * group_size; }
  std::int64_t kv_head(std::int64_t u) const { return first_head(u) / group_size; }
  std::int64_t group(std::int64_t u) const { return granularity == Granularity::per_token ? 0 : u; }
};

void run_backward(const AttentionInputs& inputs, const AttentionShape& shape, const TensorView& selection,
                  Granularity granularity, const TensorView& out, const TensorView& lse, const TensorView& grad_out,
                  const TensorView& grad_q, const TensorView& grad_k, const TensorView& grad_v, int threads,
                  AttentionKernel kernel, const detail::BackwardTerms& terms) {
  const kernels::BackwardOps ops = backward_ops(kernel);
  const UnitLayout layout(shape, granularity);
  const std::int64_t tokens = shape.tokens, heads = shape.query_heads, kv_heads = shape.kv_heads;
  const std::int64_t dim = shape.head_dim, value_dim = shape.value_dim;
  const std::int64_t dp = kernels::padded(dim);
  const std::int64_t dvp = kernels::padded(value_dim);
  const std::int64_t units = tokens * layout.units_per_token;
  const float scale = static_cast<float>(inputs.effective_scale());

  // fp32 copies: q * scale and grad_out, zero padded; lse; Delta = rowsum(grad_out * out).
  const std::vector<float> queries = prepare_queries(inputs.q, inputs.effective_scale(), dp);
  const std::vector<float> d_out = prepare_queries(grad_out, 1.0, dvp);
  std::vector<float> lse_values(static_cast<std::size_t>(tokens * heads));
  std::vector<float> delta(static_cast<std::size_t>(tokens * heads));
  // The optional terms (sparse_attention_backward.h): dlse per row, and the factor c that scales P.
  std::vector<float> grad_lse_values;
  const float* factor = terms.out_factor;
  if (!terms.grad_lse.empty()) grad_lse_values.resize(static_cast<std::size_t>(tokens * heads));
  const float* dlse = grad_lse_values.empty() ? nullptr : grad_lse_values.data();
  {
    const float* lse_data = lse.data<float>();
    const auto* out_base = static_cast<const std::byte*>(out.raw_data());
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) \
    if (tokens * heads * value_dim > kParallelWork)
    for (std::int64_t t = 0; t < tokens; ++t) {
      for (std::int64_t h = 0; h < heads; ++h) {
        lse_values[static_cast<std::size_t>(t * heads + h)] = lse_data[t * lse.stride(0) + h * lse.stride(1)];
        const float* go = d_out.data() + (t * heads + h) * dvp;
        float sum = 0.0f;
        for (std::int64_t d = 0; d < value_dim; ++d) {
          sum += go[d] * load_as_float(out, out_base, t * out.stride(0) + h * out.stride(1) + d * out.stride(2));
        }
        delta[static_cast<std::size_t>(t * heads + h)] = sum;
        if (!grad_lse_values.empty()) {
          grad_lse_values[static_cast<std::size_t>(t * heads + h)] =
              terms.grad_lse.data<float>()[t * terms.grad_lse.stride(0) + h * terms.grad_lse.stride(1)];
        }
      }
    }
  }
  if (terms.delta != nullptr) std::copy(delta.begin(), delta.end(), terms.delta);
  std::vector<std::byte> k_storage, v_storage;
  const RowSource k_rows = row_source(inputs.k, k_storage);
  const RowSource v_rows = row_source(inputs.v, v_storage);
  const std::int64_t width = selection.size(2);
  const std::int32_t* sel = selection.data<std::int32_t>();
  const std::int64_t ss[3] = {selection.stride(0), selection.stride(1), selection.stride(2)};

  // The selected keys of unit `unit` (rows are validated: distinct allowed keys, then -1 padding).
  const auto unit_count = [&](std::int64_t unit) {
    const std::int64_t t = unit / layout.units_per_token;
    const std::int64_t g = layout.group(unit % layout.units_per_token);
    std::int64_t count = 0;
    while (count < width && selection_entry(sel, ss, t, g, count) >= 0) ++count;
    return count;
  };

  // Pass 1, query-major: dQ of each unit's heads, summed over its row in row order.
  float* gq = grad_q.mutable_data<float>();
  const std::int64_t gqs[3] = {grad_q.stride(0), grad_q.stride(1), grad_q.stride(2)};
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> k_row(static_cast<std::size_t>(dp)), v_row(static_cast<std::size_t>(dvp));
    std::vector<float> dq(static_cast<std::size_t>(layout.heads_per_unit * dp));
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t unit = 0; unit < units; ++unit) {
      const std::int64_t t = unit / layout.units_per_token;
      const std::int64_t u = unit % layout.units_per_token;
      const std::int64_t g = layout.group(u);
      const std::int64_t first_head = layout.first_head(u);
      const std::int64_t kv = layout.kv_head(u);
      const std::int64_t count = unit_count(unit);
      std::fill(dq.begin(), dq.end(), 0.0f);
      for (std::int64_t i = 0; i < count; ++i) {
        const std::int64_t s = selection_entry(sel, ss, t, g, i);
        ops.convert(k_row.data(), k_rows.base + s * k_rows.token_bytes + kv * k_rows.head_bytes, inputs.k.dtype(),
                    dim, dp);
        ops.convert(v_row.data(), v_rows.base + s * v_rows.token_bytes + kv * v_rows.head_bytes, inputs.v.dtype(),
                    value_dim, dvp);
        for (std::int64_t j = 0; j < layout.heads_per_unit; ++j) {
          const std::int64_t row = t * heads + first_head + j;
          const float p_keys = std::exp(ops.dot(queries.data() + row * dp, k_row.data(), dp) -
                                        lse_values[static_cast<std::size_t>(row)]);
          const float p = factor != nullptr ? factor[row] * p_keys : p_keys;
          const float dp_value = ops.dot(d_out.data() + row * dvp, v_row.data(), dvp);
          float ds = p * (dp_value - delta[static_cast<std::size_t>(row)]);
          if (dlse != nullptr) ds += p_keys * dlse[row];
          ops.axpy(dq.data() + j * dp, scale * ds, k_row.data(), dp);
        }
      }
      for (std::int64_t j = 0; j < layout.heads_per_unit; ++j) {
        float* target = gq + t * gqs[0] + (first_head + j) * gqs[1];
        for (std::int64_t d = 0; d < dim; ++d) target[d * gqs[2]] = dq[static_cast<std::size_t>(j * dp + d)];
      }
    }
  }

  // The index of pass 2: for each (key head, key) the units that select it, ascending (CSR).
  const std::int64_t lists = kv_heads * shape.keys;  // checked by sparse_attention_backward
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(lists + 1), 0);
  for (std::int64_t unit = 0; unit < units; ++unit) {
    const std::int64_t t = unit / layout.units_per_token;
    const std::int64_t u = unit % layout.units_per_token;
    const std::int64_t kv = layout.kv_head(u);
    const std::int64_t count = unit_count(unit);
    for (std::int64_t i = 0; i < count; ++i) {
      ++offsets[static_cast<std::size_t>(kv * shape.keys + selection_entry(sel, ss, t, layout.group(u), i) + 1)];
    }
  }
  for (std::size_t i = 0; i + 1 < offsets.size(); ++i) offsets[i + 1] += offsets[i];
  std::vector<std::int32_t> entries(static_cast<std::size_t>(offsets.back()));
  {
    std::vector<std::int64_t> cursor(offsets.begin(), offsets.end() - 1);
    for (std::int64_t unit = 0; unit < units; ++unit) {
      const std::int64_t t = unit / layout.units_per_token;
      const std::int64_t u = unit % layout.units_per_token;
      const std::int64_t kv = layout.kv_head(u);
      const std::int64_t count = unit_count(unit);
      for (std::int64_t i = 0; i < count; ++i) {
        const std::int64_t list = kv * shape.keys + selection_entry(sel, ss, t, layout.group(u), i);
        entries[static_cast<std::size_t>(cursor[static_cast<std::size_t>(list)]++)] = static_cast<std::int32_t>(unit);
      }
    }
  }

  // Pass 2, key-major: each (key, key head) sums dK and dV over its units in order, on one thread.
  float* gk = grad_k.mutable_data<float>();
  float* gv = terms.values_in_keys ? nullptr : grad_v.mutable_data<float>();
  const std::int64_t gks[3] = {grad_k.stride(0), grad_k.stride(1), grad_k.stride(2)};
  const std::int64_t gvs[3] = {terms.values_in_keys ? 0 : grad_v.stride(0), terms.values_in_keys ? 0 : grad_v.stride(1),
                               terms.values_in_keys ? 0 : grad_v.stride(2)};
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> k_row(static_cast<std::size_t>(dp)), v_row(static_cast<std::size_t>(dvp));
    std::vector<float> dk(static_cast<std::size_t>(dp)), dv(static_cast<std::size_t>(dvp));
#pragma omp for schedule(dynamic, 16)
    for (std::int64_t list = 0; list < lists; ++list) {
      const std::int64_t kv = list / shape.keys;
      const std::int64_t s = list % shape.keys;
      std::fill(dk.begin(), dk.end(), 0.0f);
      std::fill(dv.begin(), dv.end(), 0.0f);
      const std::int64_t begin = offsets[static_cast<std::size_t>(list)];
      const std::int64_t end = offsets[static_cast<std::size_t>(list + 1)];
      if (end > begin) {
        ops.convert(k_row.data(), k_rows.base + s * k_rows.token_bytes + kv * k_rows.head_bytes, inputs.k.dtype(),
                    dim, dp);
        ops.convert(v_row.data(), v_rows.base + s * v_rows.token_bytes + kv * v_rows.head_bytes, inputs.v.dtype(),
                    value_dim, dvp);
      }
      for (std::int64_t e = begin; e < end; ++e) {
        const std::int64_t unit = entries[static_cast<std::size_t>(e)];
        const std::int64_t t = unit / layout.units_per_token;
        const std::int64_t first_head = layout.first_head(unit % layout.units_per_token);
        for (std::int64_t j = 0; j < layout.heads_per_unit; ++j) {
          const std::int64_t row = t * heads + first_head + j;
          const float* q_row = queries.data() + row * dp;
          const float* go = d_out.data() + row * dvp;
          const float p_keys = std::exp(ops.dot(q_row, k_row.data(), dp) - lse_values[static_cast<std::size_t>(row)]);
          const float p = factor != nullptr ? factor[row] * p_keys : p_keys;
          const float dp_value = ops.dot(go, v_row.data(), dvp);
          float ds = p * (dp_value - delta[static_cast<std::size_t>(row)]);
          if (dlse != nullptr) ds += p_keys * dlse[row];
          ops.axpy(dk.data(), ds, q_row, dp);  // q_row holds scale * q
          ops.axpy(dv.data(), p, go, dvp);
        }
      }
      float* k_target = gk + s * gks[0] + kv * gks[1];
      if (terms.values_in_keys) {  // one latent: dK + dV on the value channels
        for (std::int64_t d = 0; d < dim; ++d) {
          const float value_part = d < value_dim ? dv[static_cast<std::size_t>(d)] : 0.0f;
          k_target[d * gks[2]] = dk[static_cast<std::size_t>(d)] + value_part;
        }
        continue;
      }
      for (std::int64_t d = 0; d < dim; ++d) k_target[d * gks[2]] = dk[static_cast<std::size_t>(d)];
      float* v_target = gv + s * gvs[0] + kv * gvs[1];
      for (std::int64_t d = 0; d < value_dim; ++d) v_target[d * gvs[2]] = dv[static_cast<std::size_t>(d)];
    }
  }
}

}  // namespace

std::string_view attention_kernel_name(AttentionKernel kernel) {
  switch (kernel) {
    case AttentionKernel::automatic: return "automatic";
    case AttentionKernel::scalar: return "scalar";
    case AttentionKernel::avx2: return "avx2";
    case AttentionKernel::avx512: return "avx512";
  }
  return "unknown";
}

AttentionKernel parse_attention_kernel(std::string_view name) {
  for (const AttentionKernel k :
       {AttentionKernel::automatic, AttentionKernel::scalar, AttentionKernel::avx2, AttentionKernel::avx512}) {
    if (name == attention_kernel_name(k)) return k;
  }
  KEYSEL_CHECK_ARG(false, "name", "automatic, scalar, avx2 or avx512", name);
  return AttentionKernel::automatic;
}

std::vector<AttentionKernel> available_attention_kernels() {
  std::vector<AttentionKernel> result;
  for (const AttentionKernel k : {AttentionKernel::scalar, AttentionKernel::avx2, AttentionKernel::avx512}) {
    if (cpu_runs(k)) result.push_back(k);
  }
  return result;
}

AttentionKernel default_attention_kernel() { return kernel_of(simd_level()); }

void sparse_attention(const AttentionInputs& inputs, const TensorView& selection, Granularity granularity,
                      const TensorView& out, const TensorView& lse, const SparseAttentionOptions& options) {
  constexpr std::string_view function = "sparse_attention";
  const AttentionShape shape = inputs.validate(function, true);
  const std::int64_t groups = group_count(granularity, shape.query_heads, shape.kv_heads);
  check_output(function, out, "out", {shape.tokens, shape.query_heads, shape.value_dim});
  if (!lse.empty()) check_output(function, lse, "lse", {shape.tokens, shape.query_heads});
  KEYSEL_CHECK_ARG_IN(function, options.threads >= 0, "options.threads", ">= 0 (0: keysel::num_threads())",
                      options.threads);
  const AttentionKernel kernel = resolve_kernel(function, options.kernel);
  const std::vector<std::int64_t> positions = read_positions(inputs.positions);
  std::vector<std::int64_t> allowed(positions.size());
  for (std::size_t t = 0; t < positions.size(); ++t) allowed[t] = allowed_keys(positions[t], shape.keys);
  check_selection(function, selection, inputs.positions, allowed, shape.keys, groups);

  KeySource source;
  source.selection = selection.data<std::int32_t>();
  for (int d = 0; d < 3; ++d) source.strides[d] = selection.stride(d);
  source.width = selection.size(2);
  run_attention(inputs, shape, allowed, source, granularity, out, lse, options, kernel);
}

void full_attention_fast(const AttentionInputs& inputs, const TensorView& out, const TensorView& lse,
                         const SparseAttentionOptions& options) {
  constexpr std::string_view function = "full_attention_fast";
  const AttentionShape shape = inputs.validate(function, true);
  check_output(function, out, "out", {shape.tokens, shape.query_heads, shape.value_dim});
  if (!lse.empty()) check_output(function, lse, "lse", {shape.tokens, shape.query_heads});
  KEYSEL_CHECK_ARG_IN(function, options.threads >= 0, "options.threads", ">= 0 (0: keysel::num_threads())",
                      options.threads);
  const AttentionKernel kernel = resolve_kernel(function, options.kernel);
  const std::vector<std::int64_t> positions = read_positions(inputs.positions);
  std::vector<std::int64_t> allowed(positions.size());
  for (std::size_t t = 0; t < positions.size(); ++t) allowed[t] = allowed_keys(positions[t], shape.keys);

  std::vector<std::int32_t> prefix(static_cast<std::size_t>(shape.keys));
  std::iota(prefix.begin(), prefix.end(), 0);
  KeySource source;
  source.prefix = prefix.data();
  // Every query head reads its key head's rows once per token: the per_kv_head layout of units.
  run_attention(inputs, shape, allowed, source, Granularity::per_kv_head, out, lse, options, kernel);
}

void sparse_attention_backward(const AttentionInputs& inputs, const TensorView& selection, Granularity granularity,
                               const TensorView& out, const TensorView& lse, const TensorView& grad_out,
                               const TensorView& grad_q, const TensorView& grad_k, const TensorView& grad_v,
                               const SparseAttentionOptions& options, const TensorView& grad_lse) {
  detail::BackwardTerms terms;
  terms.grad_lse = grad_lse;
  detail::sparse_attention_backward_with_terms("sparse_attention_backward", inputs, selection, granularity, out, lse,
                                               grad_out, grad_q, grad_k, grad_v, options, terms);
}

namespace detail {

void sparse_attention_backward_with_terms(std::string_view function, const AttentionInputs& inputs,
                                          const TensorView& selection, Granularity granularity,
                                          const TensorView& out, const TensorView& lse, const TensorView& grad_out,
                                          const TensorView& grad_q, const TensorView& grad_k,
                                          const TensorView& grad_v, const SparseAttentionOptions& options,
                                          const BackwardTerms& terms) {
  const AttentionShape shape = inputs.validate(function, true);
  const std::int64_t groups = group_count(granularity, shape.query_heads, shape.kv_heads);
  check_input(function, out, "out", {shape.tokens, shape.query_heads, shape.value_dim},
              {DType::fp32, DType::bf16, DType::fp16});
  check_input(function, lse, "lse", {shape.tokens, shape.query_heads}, {DType::fp32});
  check_input(function, grad_out, "grad_out", {shape.tokens, shape.query_heads, shape.value_dim},
              {DType::fp32, DType::bf16, DType::fp16});
  if (!terms.grad_lse.empty()) {
    check_input(function, terms.grad_lse, "grad_lse", {shape.tokens, shape.query_heads}, {DType::fp32});
  }
  check_output(function, grad_q, "grad_q", {shape.tokens, shape.query_heads, shape.head_dim});
  check_output(function, grad_k, "grad_k", {shape.keys, shape.kv_heads, shape.head_dim});
  if (terms.values_in_keys) {
    KEYSEL_ASSERT(grad_v.empty() && shape.value_dim <= shape.head_dim);
  } else {
    check_output(function, grad_v, "grad_v", {shape.keys, shape.kv_heads, shape.value_dim});
  }
  KEYSEL_CHECK_ARG_IN(function, options.threads >= 0, "options.threads", ">= 0 (0: keysel::num_threads())",
                      options.threads);
  const AttentionKernel kernel = resolve_kernel(function, options.kernel);
  const std::vector<std::int64_t> positions = read_positions(inputs.positions);
  std::vector<std::int64_t> allowed(positions.size());
  for (std::size_t t = 0; t < positions.size(); ++t) allowed[t] = allowed_keys(positions[t], shape.keys);
  check_selection(function, selection, inputs.positions, allowed, shape.keys, groups);
  // The key-major index stores work units as int32 and has Hkv * N lists.
  const std::int64_t units =
      checked_mul(shape.tokens, granularity == Granularity::per_head ? shape.query_heads : shape.kv_heads, function,
                  "q");
  KEYSEL_CHECK_ARG_IN(function, units <= std::numeric_limits<std::int32_t>::max(), "q",
                      "T * (Hq for per_head, else Hkv) <= 2^31 - 1 work units", units);
  checked_mul(shape.kv_heads, shape.keys, function, "k");
  const int threads = options.threads > 0 ? options.threads : num_threads();
  run_backward(inputs, shape, selection, granularity, out, lse, grad_out, grad_q, grad_k, grad_v, threads, kernel,
               terms);
}

}  // namespace detail

}  // namespace keysel
