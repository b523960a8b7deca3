// Selection groups, the policy's checks, and the validity rules of a selection tensor (SPEC §2).
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "keysel/core/error.h"
#include "keysel/core/selection.h"

namespace keysel {
namespace {

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Granularity, GroupsOfEachLayout) {
  // Hq = 12, Hkv = 3: g = 4.
  EXPECT_EQ(group_count(Granularity::per_head, 12, 3), 12);
  EXPECT_EQ(group_count(Granularity::per_kv_head, 12, 3), 3);
  EXPECT_EQ(group_count(Granularity::per_token, 12, 3), 1);
  for (std::int64_t h = 0; h < 12; ++h) {
    EXPECT_EQ(group_of_head(Granularity::per_head, h, 12, 3), h);
    EXPECT_EQ(group_of_head(Granularity::per_kv_head, h, 12, 3), h / 4);
    EXPECT_EQ(group_of_head(Granularity::per_token, h, 12, 3), 0);
  }
  const HeadRange r = heads_of_group(Granularity::per_kv_head, 2, 12, 3);
  EXPECT_EQ(r.first, 8);
  EXPECT_EQ(r.count, 4);
  const HeadRange all = heads_of_group(Granularity::per_token, 0, 12, 3);
  EXPECT_EQ(all.first, 0);
  EXPECT_EQ(all.count, 12);
  // MQA and MHA.
  EXPECT_EQ(group_count(Granularity::per_kv_head, 8, 1), 1);
  EXPECT_EQ(group_count(Granularity::per_kv_head, 8, 8), 8);
}

TEST(Granularity, NamesRoundTripAndBadInputIsNamed) {
  for (auto g : {Granularity::per_head, Granularity::per_kv_head, Granularity::per_token}) {
    EXPECT_EQ(parse_granularity(granularity_name(g)), g);
  }
  EXPECT_NE(message_of([] { parse_granularity("per_layer"); }).find("per_layer"), std::string::npos);
  EXPECT_NE(message_of([] { group_count(Granularity::per_head, 12, 5); }).find("kv_heads"), std::string::npos);
  EXPECT_NE(message_of([] { group_of_head(Granularity::per_head, 12, 12, 3); }).find("head"), std::string::npos);
  EXPECT_NE(message_of([] { heads_of_group(Granularity::per_kv_head, 3, 12, 3); }).find("group"),
            std::string::npos);
}

TEST(SelectionPolicy, WidthAndChecks) {
  SelectionPolicy p;
  p.k = 16;
  p.n_sink = 4;
  p.n_local = 8;
  EXPECT_EQ(p.width(), 16);
  EXPECT_NO_THROW(p.validate("test"));
  p.kept_on_top = true;
  EXPECT_EQ(p.width(), 28);
  p.kept_on_top = false;
  p.n_local = 13;
  const std::string m = message_of([&] { p.validate("select"); });
  EXPECT_NE(m.find("keysel::select"), std::string::npos) << m;
  EXPECT_NE(m.find("n_sink + policy.n_local"), std::string::npos) << m;
  EXPECT_NE(m.find("17"), std::string::npos) << m;
  p.kept_on_top = true;
  EXPECT_NO_THROW(p.validate("test"));
  p.k = 0;
  EXPECT_NE(message_of([&] { p.validate("test"); }).find("policy.k"), std::string::npos);
  p.k = 4;
  p.n_sink = -1;
  EXPECT_NE(message_of([&] { p.validate("test"); }).find("policy.n_sink"), std::string::npos);
}

class ValidateSelection : public ::testing::Test {
 protected:
  // T = 2 tokens at positions 2 and 9 in a cache of N = 6 keys: 3 and 6 keys allowed.
  std::vector<std::int32_t> positions{2, 9};
  TensorView pos_view{positions.data(), DType::int32, {2}};

  std::string check(std::vector<std::int32_t> rows, std::int64_t width) {
    TensorView sel(rows.data(), DType::int32, {2, 1, width});
    return message_of([&] { validate_selection("test", sel, "selection", pos_view, 6, 1); });
  }
};

TEST_F(ValidateSelection, AcceptsValidRows) {
  EXPECT_EQ(check({2, 0, -1, -1, 5, 0, 3, 1}, 4), "");
  EXPECT_EQ(check({-1, -1, -1, -1, -1, -1, -1, -1}, 4), "");
}

TEST_F(ValidateSelection, RejectsCausallyForbiddenKey) {
  const std::string m = check({0, 3, -1, -1, 5, 0, 3, 1}, 4);
  EXPECT_NE(m.find("selection[0, 0, 1] = 3"), std::string::npos) << m;
  EXPECT_NE(m.find("[0, 3)"), std::string::npos) << m;
}

TEST_F(ValidateSelection, RejectsOutOfCacheDuplicateAndMidPadding) {
  EXPECT_NE(check({0, 1, -1, -1, 6, 0, 3, 1}, 4).find("= 6"), std::string::npos);
  EXPECT_NE(check({0, 1, -1, -1, 5, 0, 5, 1}, 4).find("repeated"), std::string::npos);
  EXPECT_NE(check({0, -1, 1, -1, 5, 0, 3, 1}, 4).find("padding"), std::string::npos);
  EXPECT_NE(check({0, 1, -1, -1, 5, -7, 3, 1}, 4).find("-7"), std::string::npos);
}

TEST_F(ValidateSelection, RejectsWrongShapeAndDtype) {
  std::vector<std::int32_t> rows(8, -1);
  TensorView wrong_groups(rows.data(), DType::int32, {2, 2, 2});
  EXPECT_NE(message_of([&] { validate_selection("test", wrong_groups, "selection", pos_view, 6, 1); })
                .find("shape [2, 1, *]"),
            std::string::npos);
  std::vector<float> as_float(8, 0.f);
  TensorView wrong_dtype(as_float.data(), DType::fp32, {2, 1, 4});
  EXPECT_NE(message_of([&] { validate_selection("test", wrong_dtype, "selection", pos_view, 6, 1); })
                .find("int32"),
            std::string::npos);
}

}  // namespace
}  // namespace keysel
