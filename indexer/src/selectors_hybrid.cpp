// Hybrid selection: candidates from any selector with a larger k', re-ranked exactly or by a given score.
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "keysel/indexer/selectors.h"
#include "keysel/core/checked.h"
#include "selectors_support.h"

namespace keysel {
namespace {

namespace support = selector_support;

class HybridSelector final : public Selector {
 public:
  HybridSelector(std::unique_ptr<Selector> candidates, std::int64_t candidate_k, CandidateScore rerank, std::string name)
      : candidates_(std::move(candidates)), candidate_k_(candidate_k), rerank_(std::move(rerank)),
        name_(name.empty() ? "hybrid(" + candidates_->name() + ")" : std::move(name)) {}

  std::string name() const override { return name_; }

  SelectionCost do_select(const SelectionRequest& request, const SelectionPolicy& policy,
                          const TensorView& selection) override {
    const auto start = support::Clock::now();
    const AttentionInputs& inputs = request.attention;
    const AttentionShape shape = inputs.shape();
    const std::int64_t groups = group_count(policy.granularity, shape.query_heads, shape.kv_heads);
    const std::vector<std::int64_t> allowed = support::allowed_per_token(inputs, shape);

    SelectionPolicy wide = policy;
    // More candidates than cached keys would only be -1 padding: cap k' at N before sizing the pool.
    wide.k = std::max(std::min(candidate_k_, shape.keys), policy.k);
    const std::int64_t wide_width = wide.width();
    std::vector<std::int32_t> pool(static_cast<std::size_t>(
        checked_product({shape.tokens, groups, wide_width}, "HybridSelector::select", "candidate pool")));
    // The candidate selector gets the whole request: the indexer's inputs and the cache state are its too.
    SelectionCost cost = candidates_->select(
        request, wide, TensorView(pool.data(), DType::int32, {shape.tokens, groups, wide_width}));

    const std::int64_t rows = shape.tokens * groups;
    const double scale = inputs.effective_scale();
    const double key_row_bytes = static_cast<double>(dtype_bytes(inputs.k.dtype(), shape.head_dim)) *
                                 static_cast<double>(policy.granularity == Granularity::per_token ? shape.kv_heads : 1);
    double macs = 0, keys_scored = 0;
    // A user score may not be thread-safe: it runs on one thread; the exact re-rank runs in parallel.
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : macs, keys_scored) if (!rerank_)
    for (std::int64_t row = 0; row < rows; ++row) {
      const std::int64_t t = row / groups;
      const std::int64_t group = row % groups;
      const SelectionRowPlan r = support::row_layout(policy, allowed[static_cast<std::size_t>(t)]);
      std::vector<std::int32_t> free_candidates, kept, chosen;
      const std::int32_t* candidates_row = pool.data() + row * wide_width;
      for (std::int64_t i = 0; i < wide_width && candidates_row[i] >= 0; ++i) {
        if (!r.is_kept(candidates_row[i])) free_candidates.push_back(candidates_row[i]);
      }
      if (static_cast<std::int64_t>(free_candidates.size()) <= r.fill) {
        chosen = std::move(free_candidates);
      } else {
        std::vector<double> scores(free_candidates.size());
        if (rerank_) {
          rerank_(t, group, free_candidates, scores);
        } else {
          for (std::int64_t s = 0; s < r.sink_end; ++s) kept.push_back(static_cast<std::int32_t>(s));
          for (std::int64_t s = r.local_begin; s < r.allowed; ++s) kept.push_back(static_cast<std::int32_t>(s));
          const support::GroupQueries g = support::group_queries(inputs, shape, policy.granularity, t, group);
          macs += support::renormalised_pbar(inputs, g, scale, free_candidates, kept, scores);
          keys_scored += static_cast<double>(free_candidates.size());
        }
        chosen = support::best_by_score(free_candidates, scores, r.fill);
      }
      support::write_row(selection, t, group, r, chosen);
    }
    cost.macs += macs;
    cost.keys_scored += keys_scored;
    cost.key_bytes_read += keys_scored * key_row_bytes;
    cost.seconds = support::seconds_since(start);
    return cost;
  }

 private:
  std::unique_ptr<Selector> candidates_;
  std::int64_t candidate_k_;
  CandidateScore rerank_;
  std::string name_;
};

}  // namespace

std::unique_ptr<Selector> make_hybrid_selector(std::unique_ptr<Selector> candidates, std::int64_t candidate_k,
                                               std::string name) {
  return make_hybrid_selector(std::move(candidates), candidate_k, CandidateScore{}, std::move(name));
}

std::unique_ptr<Selector> make_hybrid_selector(std::unique_ptr<Selector> candidates, std::int64_t candidate_k,
                                               CandidateScore rerank, std::string name) {
  KEYSEL_CHECK_ARG(candidates != nullptr, "candidates", "a selector", "nullptr");
  KEYSEL_CHECK_ARG(candidate_k >= 1, "candidate_k", ">= 1", candidate_k);
  return std::make_unique<HybridSelector>(std::move(candidates), candidate_k, std::move(rerank), std::move(name));
}

}  // namespace keysel
