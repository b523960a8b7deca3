#include "keysel/core/attention_inputs.h"

#include <cmath>
#include <string>

namespace keysel {

AttentionShape AttentionInputs::validate(std::string_view function, bool need_v) const {
  const auto floating = {DType::fp32, DType::fp16, DType::bf16};
  expect_shape(function, q, "q", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_dtype(function, q, "q", floating);
  expect_device(function, q, "q", Device::cpu());
  expect_shape(function, k, "k", {kAnyExtent, kAnyExtent, q.size(2)});
  expect_dtype(function, k, "k", floating);
  expect_device(function, k, "k", Device::cpu());
  expect_shape(function, positions, "positions", {q.size(0)});
  expect_dtype(function, positions, "positions", {DType::int32});
  expect_device(function, positions, "positions", Device::cpu());

  AttentionShape shape;
  shape.tokens = q.size(0);
  shape.query_heads = q.size(1);
  shape.head_dim = q.size(2);
  shape.keys = k.size(0);
  shape.kv_heads = k.size(1);
  KEYSEL_CHECK_ARG_IN(function, shape.head_dim >= 1, "q", "head dim D >= 1", q.str());
  KEYSEL_CHECK_ARG_IN(function, shape.query_heads >= 1, "q", "at least one query head", q.str());
  KEYSEL_CHECK_ARG_IN(function, shape.kv_heads >= 1, "k", "at least one key head", k.str());
  KEYSEL_CHECK_ARG_IN(function, shape.query_heads % shape.kv_heads == 0, "k",
                   "Hkv dividing Hq = " + std::to_string(shape.query_heads), "Hkv = " + std::to_string(shape.kv_heads));
  KEYSEL_CHECK_ARG_IN(function, shape.keys >= 1, "k", "at least one cached key", k.str());
  KEYSEL_CHECK_ARG_IN(function, shape.keys <= kMaxKeyPositions, "k",
                      "at most 2^31 - 1 cached keys (key positions are int32)", k.str());

  if (need_v || !v.empty()) {
    expect_shape(function, v, "v", {shape.keys, shape.kv_heads, kAnyExtent});
    expect_dtype(function, v, "v", floating);
    expect_device(function, v, "v", Device::cpu());
    shape.value_dim = v.size(2);
    KEYSEL_CHECK_ARG_IN(function, shape.value_dim >= 1, "v", "value dim Dv >= 1", v.str());
  }
  for (std::int64_t t = 0; t < shape.tokens; ++t) {
    const std::int64_t pos = static_cast<std::int64_t>(positions.load({t}));
    if (pos < 0) {
      detail::throw_argument_error(function, "positions", "positions >= 0",
                                   "positions[" + std::to_string(t) + "] = " + std::to_string(pos));
    }
  }
  if (!(std::isfinite(scale) && scale >= 0.0)) {
    detail::throw_argument_error(function, "scale", "a finite scale > 0 (or 0 for 1/sqrt(D))",
                                 detail::describe(scale));
  }
  return shape;
}

AttentionShape AttentionInputs::shape() const {
  AttentionShape shape;
  shape.tokens = q.size(0);
  shape.query_heads = q.size(1);
  shape.head_dim = q.size(2);
  shape.keys = k.size(0);
  shape.kv_heads = k.size(1);
  shape.value_dim = v.empty() ? 0 : v.size(2);
  return shape;
}

double AttentionInputs::effective_scale() const {
  if (scale != 0.0) return scale;
  return 1.0 / std::sqrt(static_cast<double>(q.size(2)));
}

}  // namespace keysel
