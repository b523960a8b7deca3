// The shipped top-64 fine-tuned package (models/tiny_lm_32k_topk64, docs/training.md "Top-k fine-tuning study"):
// it loads as any tiny-lm package, and decoding with the exact top-64 it predicts eval.txt better than the base
// it was fine-tuned from (models/tiny_lm_32k) and pays less for top-64 against its own full attention. Every row
// of the first 4096 bytes (the fine-tuning's window) at positions >= 128, every layer top-k: about 40 s on two
// cores (left out of the ThreadSanitizer run, which covers the same study code on smaller models).
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

#include "keysel/recall/study_config.h"

namespace keysel {
namespace {

struct TopkBits {
  double topk = 0.0;  // bits per byte with the exact top-64 (per_token), rows at positions >= 128
  double full = 0.0;  // the same rows with full attention
};

TopkBits decode_bits(const std::string& package) {
  const std::filesystem::path models = std::filesystem::path(__FILE__).parent_path() / "../../models";
  const nlohmann::json config = {
      {"workloads",
       {{{"type", "tiny-lm"}, {"name", package}, {"model", (models / package).string()},
         {"text", (models / "tiny_lm_32k" / "eval.txt").string()}, {"tokens", 4096}, {"offset", 0},
         {"mode", "forward"}, {"bpb_from", "sparse"}}}},
      {"selectors", {{{"type", "exact"}}}},
      {"k", 64},
      {"granularity", "per_token"}};
  const StudySuiteResult result = run_study_config(parse_study_config(config.dump()));
  const StudyResult& study = result.studies.at(0);
  return {study.rows.at(0).metrics.at("bpb").mean, study.full_bpb.mean};
}

TEST(TinyLmFinetuned, TopkFinetunedPackageDecodesTopkBetterThanItsBase) {
  const TopkBits base = decode_bits("tiny_lm_32k");
  const TopkBits tuned = decode_bits("tiny_lm_32k_topk64");
  std::printf("exact top-64 / full bits per byte: base %.4f / %.4f, top-64 fine-tuned %.4f / %.4f\n", base.topk,
              base.full, tuned.topk, tuned.full);
  EXPECT_LT(tuned.topk, base.topk - 0.01);
  EXPECT_LT(tuned.topk - tuned.full, base.topk - base.full - 0.01);
}

}  // namespace
}  // namespace keysel
