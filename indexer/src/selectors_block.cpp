// Quest-style block top-k: per-block channel-wise min/max of the keys bound each block's logits; the blocks
// with the best pbar-consistent bound are taken, then their keys (re-ranked exactly when they are too many).
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "keysel/core/checked.h"
#include "keysel/indexer/selectors.h"
#include "selectors_support.h"

namespace keysel {
namespace {

namespace support = selector_support;

/// min((b + 1) * B, limit) without forming (b + 1) * B, which overflows for block sizes near INT64_MAX.
std::int64_t block_end(std::int64_t b, std::int64_t B, std::int64_t limit) {
  return limit - b * B <= B ? limit : (b + 1) * B;
}

class BlockTopKSelector final : public Selector {
 public:
  explicit BlockTopKSelector(const BlockTopKOptions& options) : options_(options) {}

  std::string name() const override {
    std::string n = "block-topk-b" + std::to_string(options_.block_size);
    if (options_.oversample != 1.0) n += "-x" + std::to_string(options_.oversample).substr(0, 4);
    return n;
  }

  SelectionCost do_select(const SelectionRequest& request, const SelectionPolicy& policy,
                          const TensorView& selection) override {
    const auto start = support::Clock::now();
    const AttentionInputs& inputs = request.attention;
    const AttentionShape shape = inputs.shape();
    const std::int64_t groups = group_count(policy.granularity, shape.query_heads, shape.kv_heads);
    const std::vector<std::int64_t> allowed = support::allowed_per_token(inputs, shape);
    const std::int64_t B = options_.block_size;
    const std::int64_t D = shape.head_dim;
    const std::int64_t blocks = ceil_div(shape.keys, B);  // B may be anything up to INT64_MAX
    const double scale = inputs.effective_scale();

    // Channel-wise min and max of every block of every key head: [Hkv, blocks, D] each. The summaries of
    // blocks wholly inside the reusable keys are kept; the rest are (re)computed. Reusable are the keys the
    // request declares unchanged (CacheReuse::appended), or, when it says nothing, the keys summarised last
    // time if options_.reuse_summaries is on and inputs.k is the same view, grown or not.
    const ViewKey key{inputs.k.raw_data(), inputs.k.dtype(), shape.kv_heads, D, inputs.k.stride(0), inputs.k.stride(1),
                      inputs.k.stride(2)};
    std::int64_t reusable = 0;
    const bool same_layout = summary_blocks_ > 0 && key.dtype == key_.dtype && key.kv_heads == key_.kv_heads &&
                             key.dim == key_.dim;
    switch (request.cache) {
      case CacheReuse::appended:
        if (same_layout) reusable = std::min(summarised_keys_, request.unchanged_keys);
        break;
      case CacheReuse::unknown:
        if (options_.reuse_summaries && key == key_ && shape.keys >= summarised_keys_) reusable = summarised_keys_;
        break;
      case CacheReuse::fresh:
        break;
    }
    std::int64_t first_block = 0;
    if (reusable > 0) {
      first_block = reusable / B;  // the block holding key `reusable` may have changed or grown
      resize_summaries(shape.kv_heads, blocks, D);
    } else {
      lo_.assign(static_cast<std::size_t>(shape.kv_heads * blocks * D), 0.0);
      hi_.assign(lo_.size(), 0.0);
      summary_blocks_ = blocks;
    }
    key_ = key;
    summarised_keys_ = shape.keys;
    const std::vector<double>& lo = lo_;
    const std::vector<double>& hi = hi_;
#pragma omp parallel
    {
      std::vector<double> row(static_cast<std::size_t>(D));
#pragma omp for collapse(2) schedule(static)
      for (std::int64_t kv = 0; kv < shape.kv_heads; ++kv) {
        for (std::int64_t b = first_block; b < blocks; ++b) {
          double* mn = lo_.data() + (kv * blocks + b) * D;
          double* mx = hi_.data() + (kv * blocks + b) * D;
          std::fill(mn, mn + D, std::numeric_limits<double>::infinity());
          std::fill(mx, mx + D, -std::numeric_limits<double>::infinity());
          for (std::int64_t s = b * B; s < block_end(b, B, shape.keys); ++s) {
            support::load_row(inputs.k, s, kv, row.data());
            for (std::int64_t d = 0; d < D; ++d) {
              mn[d] = std::min(mn[d], row[static_cast<std::size_t>(d)]);
              mx[d] = std::max(mx[d], row[static_cast<std::size_t>(d)]);
            }
          }
        }
      }
    }

    const std::int64_t rows = shape.tokens * groups;
    const double summary_bytes = 2.0 * static_cast<double>(dtype_bytes(inputs.k.dtype(), D));
    double key_bytes = 0, macs = 0, keys_scored = 0;
#pragma omp parallel reduction(+ : key_bytes, macs, keys_scored)
    {
      std::vector<double> bound, score, z_max, z_sum;
      std::vector<std::int32_t> block_ids, candidates, kept, chosen;
#pragma omp for schedule(dynamic, 1)
      for (std::int64_t row = 0; row < rows; ++row) {
        const std::int64_t t = row / groups;
        const std::int64_t group = row % groups;
        const SelectionRowPlan r = support::row_layout(policy, allowed[static_cast<std::size_t>(t)]);
        chosen.clear();
        if (r.fill >= r.free_keys()) {
          for (std::int64_t s = r.sink_end; s < r.local_begin; ++s) chosen.push_back(static_cast<std::int32_t>(s));
          support::write_row(selection, t, group, r, chosen);
          continue;
        }
        const support::GroupQueries g = support::group_queries(inputs, shape, policy.granularity, t, group);
        // Logit bounds U[h, b] of the blocks holding allowed keys, and Z_h = sum_b n_b exp(U[h,b] - max_h).
        const std::int64_t used_blocks = ceil_div(r.allowed, B);
        bound.assign(static_cast<std::size_t>(g.count * used_blocks), 0.0);
        z_max.assign(static_cast<std::size_t>(g.count), -std::numeric_limits<double>::infinity());
        z_sum.assign(static_cast<std::size_t>(g.count), 0.0);
        for (std::int64_t i = 0; i < g.count; ++i) {
          const double* q = g.q.data() + i * D;
          const std::int64_t kv = g.kv[static_cast<std::size_t>(i)];
          double* u = bound.data() + i * used_blocks;
          for (std::int64_t b = 0; b < used_blocks; ++b) {
            const double* mn = lo.data() + (kv * blocks + b) * D;
            const double* mx = hi.data() + (kv * blocks + b) * D;
            double dot = 0.0;
            for (std::int64_t d = 0; d < D; ++d) dot += std::max(q[d] * mn[d], q[d] * mx[d]);
            u[b] = scale * dot;
            z_max[static_cast<std::size_t>(i)] = std::max(z_max[static_cast<std::size_t>(i)], u[b]);
          }
          for (std::int64_t b = 0; b < used_blocks; ++b) {
            const double n_b = static_cast<double>(block_end(b, B, r.allowed) - b * B);
            z_sum[static_cast<std::size_t>(i)] += n_b * std::exp(u[b] - z_max[static_cast<std::size_t>(i)]);
          }
        }
        // Score of the blocks that hold free keys.
        const std::int64_t first_free_block = r.sink_end / B;
        const std::int64_t last_block = (r.local_begin - 1) / B;
        block_ids.clear();
        score.clear();
        for (std::int64_t b = first_free_block; b <= last_block; ++b) {
          double sum = 0.0;
          for (std::int64_t i = 0; i < g.count; ++i) {
            const double factor = 1.0 / (z_sum[static_cast<std::size_t>(i)] * static_cast<double>(g.count));
            sum += std::exp(bound[static_cast<std::size_t>(i * used_blocks + b)] - z_max[static_cast<std::size_t>(i)]) *
                   factor;
          }
          block_ids.push_back(static_cast<std::int32_t>(b));
          score.push_back(sum);
        }
        macs += 2.0 * static_cast<double>(used_blocks * D * g.count);
        key_bytes += summary_bytes * static_cast<double>(used_blocks) *
                     static_cast<double>(policy.granularity == Granularity::per_token ? shape.kv_heads : 1);

        // Blocks in order of score until their free keys reach the target.
        // In double, capped at the free keys before the conversion (oversample may be as large as 1e308).
        const double wanted = std::ceil(options_.oversample * static_cast<double>(r.fill));
        const std::int64_t target =
            wanted >= static_cast<double>(r.free_keys()) ? r.free_keys() : static_cast<std::int64_t>(wanted);
        std::vector<std::int32_t> ranked;
        for (std::size_t i = 0; i < block_ids.size(); ++i) {
          if (!std::isnan(score[i])) ranked.push_back(block_ids[i]);
        }
        std::sort(ranked.begin(), ranked.end(), [&](std::int32_t a, std::int32_t b) {
          const double sa = score[static_cast<std::size_t>(a - first_free_block)];
          const double sb = score[static_cast<std::size_t>(b - first_free_block)];
          return sa != sb ? sa > sb : a < b;
        });
        candidates.clear();
        for (const std::int32_t b : ranked) {
          if (static_cast<std::int64_t>(candidates.size()) >= target) break;
          for (std::int64_t s = std::max<std::int64_t>(b * B, r.sink_end); s < block_end(b, B, r.local_begin); ++s) {
            candidates.push_back(static_cast<std::int32_t>(s));
          }
        }
        if (static_cast<std::int64_t>(candidates.size()) <= r.fill) {
          chosen = candidates;
        } else {
          // More candidate keys than slots: the exact re-rank.
          kept.clear();
          for (std::int64_t s = 0; s < r.sink_end; ++s) kept.push_back(static_cast<std::int32_t>(s));
          for (std::int64_t s = r.local_begin; s < r.allowed; ++s) kept.push_back(static_cast<std::int32_t>(s));
          std::vector<double> exact(candidates.size());
          macs += support::renormalised_pbar(inputs, g, scale, candidates, kept, exact);
          keys_scored += static_cast<double>(candidates.size());
          key_bytes += static_cast<double>(candidates.size()) * static_cast<double>(dtype_bytes(inputs.k.dtype(), D)) *
                       static_cast<double>(policy.granularity == Granularity::per_token ? shape.kv_heads : 1);
          chosen = support::best_by_score(candidates, exact, r.fill);
        }
        support::write_row(selection, t, group, r, chosen);
      }
    }
    SelectionCost cost;
    cost.key_bytes_read = key_bytes;
    cost.macs = macs;
    cost.keys_scored = keys_scored;
    cost.rows = rows;
    cost.seconds = support::seconds_since(start);
    return cost;
  }

 private:
  /// What identifies the K view the summaries were computed from.
  struct ViewKey {
    const void* data = nullptr;
    DType dtype = DType::fp32;
    std::int64_t kv_heads = 0, dim = 0, stride0 = 0, stride1 = 0, stride2 = 0;
    bool operator==(const ViewKey&) const = default;
  };

  /// Re-lays the summaries [Hkv, summary_blocks_, D] out for `blocks` blocks per key head (the leading
  /// min(summary_blocks_, blocks) of each head are kept).
  void resize_summaries(std::int64_t kv_heads, std::int64_t blocks, std::int64_t dim) {
    if (blocks == summary_blocks_) return;
    std::vector<double> lo(static_cast<std::size_t>(kv_heads * blocks * dim));
    std::vector<double> hi(lo.size());
    const std::int64_t kept = std::min(summary_blocks_, blocks) * dim;
    for (std::int64_t kv = 0; kv < kv_heads; ++kv) {
      std::copy_n(lo_.begin() + kv * summary_blocks_ * dim, kept, lo.begin() + kv * blocks * dim);
      std::copy_n(hi_.begin() + kv * summary_blocks_ * dim, kept, hi.begin() + kv * blocks * dim);
    }
    lo_ = std::move(lo);
    hi_ = std::move(hi);
    summary_blocks_ = blocks;
  }

  BlockTopKOptions options_;
  ViewKey key_;
  std::int64_t summarised_keys_ = 0;
  std::int64_t summary_blocks_ = 0;
  std::vector<double> lo_, hi_;
};

}  // namespace

std::unique_ptr<Selector> make_block_topk_selector(const BlockTopKOptions& options) {
  KEYSEL_CHECK_ARG(options.block_size >= 1, "options.block_size", ">= 1", options.block_size);
  KEYSEL_CHECK_ARG(std::isfinite(options.oversample) && options.oversample >= 1.0, "options.oversample",
                   "a finite value >= 1", options.oversample);
  return std::make_unique<BlockTopKSelector>(options);
}

}  // namespace keysel
