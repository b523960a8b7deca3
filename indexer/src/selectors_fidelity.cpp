// Controlled fidelity: selections whose retrieval precision against the exact top-k is set exactly.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "keysel/core/checked.h"
#include "keysel/attention/reference.h"
#include "keysel/core/random.h"
#include "keysel/indexer/selectors.h"
#include "selectors_support.h"

namespace keysel {
namespace {

namespace support = selector_support;

class FidelitySelector final : public Selector {
 public:
  explicit FidelitySelector(const FidelityOptions& options) : options_(options) {}

  std::string name() const override {
    const int percent = static_cast<int>(std::lround(options_.precision * 100.0));
    return std::string("fidelity-p") + std::to_string(percent) +
           (options_.fill == FidelityFill::random ? "-random" : "-next") +
           (options_.drop == FidelityDrop::lowest ? "-droplowest" : "");
  }

  SelectionCost do_select(const SelectionRequest& request, const SelectionPolicy& policy,
                          const TensorView& selection) override {
    const auto start = support::Clock::now();
    const AttentionInputs& inputs = request.attention;
    const AttentionShape shape = inputs.shape();
    const std::int64_t groups = group_count(policy.granularity, shape.query_heads, shape.kv_heads);
    const std::vector<std::int64_t> allowed = support::allowed_per_token(inputs, shape);

    std::vector<double> pbar(static_cast<std::size_t>(
        checked_product({shape.tokens, groups, shape.keys}, "FidelitySelector::select", "pbar [T, G, N]")));
    group_probabilities(inputs, policy.granularity, TensorView(pbar.data(), DType::fp64, {shape.tokens, groups, shape.keys}));

    const std::int64_t rows = shape.tokens * groups;
#pragma omp parallel
    {
      std::vector<std::int32_t> ranked, chosen, in_e, out_e;
#pragma omp for schedule(dynamic, 1)
      for (std::int64_t row = 0; row < rows; ++row) {
        const std::int64_t t = row / groups;
        const std::int64_t group = row % groups;
        const SelectionRowPlan r = support::row_layout(policy, allowed[static_cast<std::size_t>(t)]);
        const double* p = pbar.data() + row * shape.keys;

        // E = the k_eff allowed keys with the largest pbar (SPEC §2; equal values: lower position first, as
        // select_topk breaks ties). Kept keys are in every row whether or not they are in E.
        ranked.clear();
        for (std::int64_t s = 0; s < r.allowed; ++s) ranked.push_back(static_cast<std::int32_t>(s));
        std::sort(ranked.begin(), ranked.end(), [&](std::int32_t a, std::int32_t b) {
          return p[a] != p[b] ? p[a] > p[b] : a < b;
        });
        const std::int64_t k_eff = std::min(policy.k, r.allowed);
        std::int64_t kept_in_e = 0;
        in_e.clear();
        out_e.clear();
        for (std::int64_t i = 0; i < r.allowed; ++i) {
          const std::int32_t s = ranked[static_cast<std::size_t>(i)];
          if (r.is_kept(s)) {
            kept_in_e += i < k_eff ? 1 : 0;
          } else {
            (i < k_eff ? in_e : out_e).push_back(s);  // free keys in E / outside E, best first
          }
        }
        // `hits` free keys of E and `misses` free keys outside it fill the row's free slots.
        const std::int64_t slots = r.fill;
        const std::int64_t in_count = static_cast<std::int64_t>(in_e.size());
        const std::int64_t out_count = static_cast<std::int64_t>(out_e.size());
        const std::int64_t wanted = std::llround(options_.precision * static_cast<double>(k_eff)) - kept_in_e;
        const std::int64_t hits =
            std::clamp<std::int64_t>(wanted, std::max<std::int64_t>(0, slots - out_count), std::min(slots, in_count));
        const std::int64_t misses = slots - hits;

        RandomStream random(options_.seed, static_cast<std::uint64_t>(row));
        chosen.clear();
        // A uniformly random subset of `hits` free keys of E (partial Fisher-Yates), or its best `hits` keys.
        for (std::int64_t i = 0; i < hits && options_.drop == FidelityDrop::lowest; ++i) {
          chosen.push_back(in_e[static_cast<std::size_t>(i)]);
        }
        for (std::int64_t i = 0; i < hits && options_.drop == FidelityDrop::random; ++i) {
          const auto j = i + static_cast<std::int64_t>(random.uniform_int(static_cast<std::uint64_t>(in_count - i)));
          std::swap(in_e[static_cast<std::size_t>(i)], in_e[static_cast<std::size_t>(j)]);
          chosen.push_back(in_e[static_cast<std::size_t>(i)]);
        }
        if (options_.fill == FidelityFill::next_ranked) {
          for (std::int64_t i = 0; i < misses; ++i) chosen.push_back(out_e[static_cast<std::size_t>(i)]);
        } else {
          for (std::int64_t i = 0; i < misses; ++i) {
            const auto j = i + static_cast<std::int64_t>(random.uniform_int(static_cast<std::uint64_t>(out_count - i)));
            std::swap(out_e[static_cast<std::size_t>(i)], out_e[static_cast<std::size_t>(j)]);
            chosen.push_back(out_e[static_cast<std::size_t>(i)]);
          }
        }
        support::write_row(selection, t, group, r, chosen);
      }
    }
    // Cost of the exact scoring it stands on (every allowed key of every head), as the exact selector reports.
    SelectionCost cost;
    const std::int64_t heads_per_group = shape.query_heads / groups;
    const std::int64_t key_heads = policy.granularity == Granularity::per_token ? shape.kv_heads : 1;
    for (const std::int64_t a : allowed) {
      const double n = static_cast<double>(a * groups);
      cost.keys_scored += n;
      cost.macs += n * static_cast<double>(shape.head_dim * heads_per_group);
      cost.key_bytes_read += n * static_cast<double>(dtype_bytes(inputs.k.dtype(), shape.head_dim) * key_heads);
    }
    cost.rows = rows;
    cost.seconds = support::seconds_since(start);
    return cost;
  }

 private:
  FidelityOptions options_;
};

}  // namespace

std::unique_ptr<Selector> make_fidelity_selector(const FidelityOptions& options) {
  KEYSEL_CHECK_ARG(options.precision >= 0.0 && options.precision <= 1.0, "options.precision", "a value in [0, 1]",
                   options.precision);
  return std::make_unique<FidelitySelector>(options);
}

}  // namespace keysel
