// TensorView: shapes, strides, element access of every dtype, and the argument checks public functions use.
#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "keysel/core/dtype.h"
#include "keysel/core/error.h"
#include "keysel/core/tensor.h"

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

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

std::vector<std::int64_t> as_vector(std::span<const std::int64_t> values) { return {values.begin(), values.end()}; }

// ---- shape, strides, sizes ---------------------------------------------------------------------------------

TEST(TensorView, ContiguousRowMajorStrides) {
  std::vector<float> data(24);
  const TensorView view(data.data(), DType::fp32, {2, 3, 4});
  EXPECT_FALSE(view.empty());
  EXPECT_EQ(view.rank(), 3);
  EXPECT_EQ(as_vector(view.shape()), (std::vector<std::int64_t>{2, 3, 4}));
  EXPECT_EQ(as_vector(view.strides()), (std::vector<std::int64_t>{12, 4, 1}));
  EXPECT_EQ(view.size(1), 3);
  EXPECT_EQ(view.stride(0), 12);
  EXPECT_EQ(view.numel(), 24);
  EXPECT_EQ(view.bytes(), 96);
  EXPECT_TRUE(view.is_contiguous());
  EXPECT_FALSE(view.read_only());
  EXPECT_EQ(view.device(), Device::cpu());
  EXPECT_EQ(view.dtype(), DType::fp32);
  EXPECT_EQ(view.raw_data(), data.data());
  EXPECT_EQ(view.str(), "[2, 3, 4] fp32 cpu");
  const std::array<std::int64_t, 3> index = {1, 2, 3};
  EXPECT_EQ(view.offset(index), 12 + 8 + 3);
}

TEST(TensorView, SpanShapeConstructorMatchesInitializerList) {
  std::vector<std::int16_t> data(6);
  const std::array<std::int64_t, 2> shape = {3, 2};
  const TensorView view(static_cast<void*>(data.data()), DType::fp16, std::span<const std::int64_t>(shape));
  EXPECT_EQ(as_vector(view.strides()), (std::vector<std::int64_t>{2, 1}));
  EXPECT_EQ(view.bytes(), 12);
  EXPECT_FALSE(view.read_only());
}

TEST(TensorView, DefaultViewIsEmpty) {
  const TensorView view;
  EXPECT_TRUE(view.empty());
  EXPECT_EQ(view.rank(), 0);
  EXPECT_EQ(view.numel(), 0);
  EXPECT_EQ(view.bytes(), 0);
}

TEST(TensorView, ZeroExtentsAllowNullData) {
  const TensorView view(static_cast<void*>(nullptr), DType::fp32, {0, 4});
  EXPECT_FALSE(view.empty());  // a rank-2 tensor with no elements, not an absent argument
  EXPECT_EQ(view.numel(), 0);
  EXPECT_EQ(view.bytes(), 0);
  EXPECT_TRUE(to_double_vector(view).empty());
}

TEST(TensorView, ByteCountsOfEachDtype) {
  std::array<std::uint8_t, 64> buffer{};
  EXPECT_EQ(TensorView(buffer.data(), DType::fp16, {3, 5}).bytes(), 30);
  EXPECT_EQ(TensorView(buffer.data(), DType::bf16, {7}).bytes(), 14);
  EXPECT_EQ(TensorView(buffer.data(), DType::fp8_e4m3, {3, 5}).bytes(), 15);
  EXPECT_EQ(TensorView(buffer.data(), DType::int8, {3, 5}).bytes(), 15);
  EXPECT_EQ(TensorView(buffer.data(), DType::int32, {2, 3}).bytes(), 24);
  EXPECT_EQ(TensorView(buffer.data(), DType::fp64, {2, 3}).bytes(), 48);
  // int4: two codes per byte, an odd count rounds up.
  EXPECT_EQ(TensorView(buffer.data(), DType::int4, {3, 5}).numel(), 15);
  EXPECT_EQ(TensorView(buffer.data(), DType::int4, {3, 5}).bytes(), 8);
  EXPECT_EQ(TensorView(buffer.data(), DType::int4, {4, 4}).bytes(), 8);
}

TEST(TensorView, StridedViews) {
  // A 2 x 3 row-major matrix seen transposed (3 x 2) and as every other row of a 4 x 3 buffer.
  const std::array<float, 12> data = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
  const std::array<std::int64_t, 2> shape = {3, 2};
  const std::array<std::int64_t, 2> strides = {1, 3};
  const TensorView transposed(data.data(), DType::fp32, shape, strides);
  EXPECT_TRUE(transposed.read_only());  // the strided constructor is read-only unless asked otherwise
  EXPECT_FALSE(transposed.is_contiguous());
  EXPECT_EQ(transposed.numel(), 6);
  EXPECT_EQ(transposed.load({2, 1}), 5.0);
  EXPECT_EQ(transposed.load({0, 1}), 3.0);
  EXPECT_EQ(to_double_vector(transposed), (std::vector<double>{0, 3, 1, 4, 2, 5}));

  const std::array<std::int64_t, 2> rows_shape = {2, 3};
  const std::array<std::int64_t, 2> rows_strides = {6, 1};
  const TensorView every_other_row(data.data(), DType::fp32, rows_shape, rows_strides);
  EXPECT_FALSE(every_other_row.is_contiguous());
  EXPECT_EQ(to_double_vector(every_other_row), (std::vector<double>{0, 1, 2, 6, 7, 8}));

  // Extents of 1 may carry any stride and still be contiguous; strides given explicitly can be contiguous.
  const std::array<std::int64_t, 3> unit_shape = {1, 2, 3};
  const std::array<std::int64_t, 3> unit_strides = {100, 3, 1};
  EXPECT_TRUE(TensorView(data.data(), DType::fp32, unit_shape, unit_strides).is_contiguous());

  const TensorView writable(data.data(), DType::fp32, shape, strides, Device::cpu(), false);
  EXPECT_FALSE(writable.read_only());
}

TEST(TensorView, StridedInt4ViewOfRows) {
  // Three rows of four int4 codes (two bytes a row); the view takes rows 0 and 2.
  const std::array<std::uint8_t, 6> bytes = {pack_int4(1, 2), pack_int4(3, 4),  pack_int4(-1, -2),
                                             pack_int4(-3, -4), pack_int4(7, -8), pack_int4(0, 5)};
  const std::array<std::int64_t, 2> shape = {2, 4};
  const std::array<std::int64_t, 2> strides = {8, 1};
  const TensorView view(bytes.data(), DType::int4, shape, strides);
  EXPECT_EQ(to_double_vector(view), (std::vector<double>{1, 2, 3, 4, 7, -8, 0, 5}));
}

// ---- element access ----------------------------------------------------------------------------------------

TEST(TensorView, LoadOfEveryDtype) {
  const std::array<float, 2> fp32 = {1.5f, -2.25f};
  EXPECT_EQ(TensorView(fp32.data(), DType::fp32, {2}).load({1}), -2.25);

  const std::array<double, 2> fp64 = {0.1, -1e300};
  EXPECT_EQ(TensorView(fp64.data(), DType::fp64, {2}).load({0}), 0.1);
  EXPECT_EQ(TensorView(fp64.data(), DType::fp64, {2}).load({1}), -1e300);

  const std::array<std::uint16_t, 3> fp16 = {0x3E00 /* 1.5 */, 0xC000 /* -2 */, 0x0001 /* 2^-24 */};
  const TensorView fp16_view(fp16.data(), DType::fp16, {3});
  EXPECT_EQ(fp16_view.load({0}), 1.5);
  EXPECT_EQ(fp16_view.load({1}), -2.0);
  EXPECT_EQ(fp16_view.load({2}), 0x1p-24);

  const std::array<std::uint16_t, 2> bf16 = {0x3FC0 /* 1.5 */, 0xC2F7 /* -123.5 */};
  EXPECT_EQ(TensorView(bf16.data(), DType::bf16, {2}).load({0}), 1.5);
  EXPECT_EQ(TensorView(bf16.data(), DType::bf16, {2}).load({1}), -123.5);

  const std::array<std::uint8_t, 3> e4m3 = {0x38 /* 1 */, 0xFE /* -448 */, 0x01 /* 2^-9 */};
  const TensorView e4m3_view(e4m3.data(), DType::fp8_e4m3, {3});
  EXPECT_EQ(e4m3_view.load({0}), 1.0);
  EXPECT_EQ(e4m3_view.load({1}), -448.0);
  EXPECT_EQ(e4m3_view.load({2}), 0x1p-9);

  const std::array<std::uint8_t, 2> e5m2 = {0x3C /* 1 */, 0x7B /* 57344 */};
  EXPECT_EQ(TensorView(e5m2.data(), DType::fp8_e5m2, {2}).load({0}), 1.0);
  EXPECT_EQ(TensorView(e5m2.data(), DType::fp8_e5m2, {2}).load({1}), 57344.0);

  const std::array<std::int8_t, 2> int8 = {-127, 42};
  EXPECT_EQ(TensorView(int8.data(), DType::int8, {2}).load({0}), -127.0);
  EXPECT_EQ(TensorView(int8.data(), DType::int8, {2}).load({1}), 42.0);

  const std::array<std::int32_t, 2> int32 = {-2147483647 - 1, 7};
  EXPECT_EQ(TensorView(int32.data(), DType::int32, {2}).load({0}), -2147483648.0);

  // int4: element 2i in the low nibble of byte i, 2i + 1 in the high nibble.
  const std::array<std::uint8_t, 3> int4 = {pack_int4(3, -2), pack_int4(-8, 7), pack_int4(-7, 0)};
  const TensorView int4_view(int4.data(), DType::int4, {2, 3});
  EXPECT_EQ(int4_view.load({0, 0}), 3.0);
  EXPECT_EQ(int4_view.load({0, 1}), -2.0);
  EXPECT_EQ(int4_view.load({0, 2}), -8.0);
  EXPECT_EQ(int4_view.load({1, 0}), 7.0);
  EXPECT_EQ(int4_view.load({1, 1}), -7.0);
  EXPECT_EQ(int4_view.load({1, 2}), 0.0);
  EXPECT_EQ(to_double_vector(int4_view), (std::vector<double>{3, -2, -8, 7, -7, 0}));
}

TEST(TensorView, LoadChecksTheIndex) {
  const std::array<float, 6> data{};
  const TensorView view(data.data(), DType::fp32, {2, 3});
  const std::string wrong_count = message_of([&] { view.load({1}); });
  EXPECT_TRUE(contains(wrong_count, "'index'")) << wrong_count;
  EXPECT_TRUE(contains(wrong_count, "2 coordinates")) << wrong_count;
  const std::string outside = message_of([&] { view.load({0, 3}); });
  EXPECT_TRUE(contains(outside, "'index'")) << outside;
  EXPECT_TRUE(contains(outside, "[0, 3]")) << outside;
  EXPECT_THROW(view.load({-1, 0}), Error);
  EXPECT_THROW(view.size(2), Error);
  EXPECT_THROW(view.stride(-1), Error);
}

TEST(TensorView, GpuViewsAreNotReadOnTheHost) {
  const std::array<float, 2> data{};
  const TensorView view(data.data(), DType::fp32, {2}, Device::cuda(0));
  EXPECT_EQ(view.str(), "[2] fp32 cuda:0");
  const std::string load = message_of([&] { view.load({0}); });
  EXPECT_TRUE(contains(load, "CPU")) << load;
  const std::string copy = message_of([&] { to_double_vector(view); });
  EXPECT_TRUE(contains(copy, "to_double_vector")) << copy;
  EXPECT_TRUE(contains(copy, "cuda:0")) << copy;
}

TEST(TensorView, ReadOnlyViewsRefuseMutableData) {
  std::array<float, 4> data{};
  const TensorView writable(data.data(), DType::fp32, {4});
  EXPECT_EQ(writable.mutable_data<float>(), data.data());
  writable.mutable_data<float>()[2] = 3.0f;
  EXPECT_EQ(writable.load({2}), 3.0);

  const float* const_data = data.data();
  const TensorView read_only(const_data, DType::fp32, {4});
  EXPECT_TRUE(read_only.read_only());
  EXPECT_EQ(read_only.data<float>(), data.data());
  const std::string message = message_of([&] { read_only.mutable_data<float>(); });
  EXPECT_TRUE(contains(message, "read-only")) << message;
  EXPECT_TRUE(contains(message, "writable")) << message;
  EXPECT_THROW(read_only.mutable_raw_data(), Error);
}

// ---- constructor errors ------------------------------------------------------------------------------------

TEST(TensorView, ConstructorErrors) {
  std::array<float, 8> data{};

  const std::string negative = message_of([&] { TensorView(data.data(), DType::fp32, {2, -1}); });
  EXPECT_TRUE(contains(negative, "'shape'")) << negative;
  EXPECT_TRUE(contains(negative, "non-negative")) << negative;
  EXPECT_TRUE(contains(negative, "[2, -1]")) << negative;

  const std::string null_data = message_of([] { TensorView(static_cast<void*>(nullptr), DType::fp32, {2, 3}); });
  EXPECT_TRUE(contains(null_data, "'data'")) << null_data;
  EXPECT_TRUE(contains(null_data, "nullptr")) << null_data;

  const std::string too_deep = message_of([&] { TensorView(data.data(), DType::fp32, {1, 1, 1, 1, 1, 1, 1}); });
  EXPECT_TRUE(contains(too_deep, "'shape'")) << too_deep;
  EXPECT_TRUE(contains(too_deep, "rank <= 6")) << too_deep;
  EXPECT_NO_THROW(TensorView(data.data(), DType::fp32, {1, 1, 1, 1, 1, 1}));

  const std::array<std::int64_t, 2> shape = {2, 3};
  const std::array<std::int64_t, 1> one_stride = {1};
  const std::string stride_count = message_of([&] {
    TensorView(data.data(), DType::fp32, shape, std::span<const std::int64_t>(one_stride));
  });
  EXPECT_TRUE(contains(stride_count, "'strides'")) << stride_count;
  EXPECT_TRUE(contains(stride_count, "one stride per dimension (2)")) << stride_count;
  EXPECT_TRUE(contains(stride_count, "got [1]")) << stride_count;

  const std::array<std::int64_t, 2> negative_strides = {-3, 1};
  EXPECT_THROW(TensorView(data.data(), DType::fp32, shape, negative_strides), Error);

  // int4 packs along the last dimension, which therefore has to be contiguous.
  const std::array<std::int64_t, 2> int4_strides = {1, 2};
  const std::string int4 = message_of([&] { TensorView(data.data(), DType::int4, shape, int4_strides); });
  EXPECT_TRUE(contains(int4, "int4")) << int4;
}

// ---- argument checks ---------------------------------------------------------------------------------------

TEST(ExpectChecks, ShapeMessageNamesFunctionArgumentExpectedAndReceived) {
  std::array<float, 6> data{};
  const TensorView view(data.data(), DType::fp32, {2, 3});
  EXPECT_NO_THROW(expect_shape("attend", view, "keys", {2, 3}));
  EXPECT_NO_THROW(expect_shape("attend", view, "keys", {kAnyExtent, 3}));
  EXPECT_NO_THROW(expect_shape("attend", view, "keys", {kAnyExtent, kAnyExtent}));

  const std::string wrong_extent = message_of([&] { expect_shape("attend", view, "keys", {2, 4}); });
  EXPECT_TRUE(contains(wrong_extent, "keysel::attend")) << wrong_extent;
  EXPECT_TRUE(contains(wrong_extent, "'keys'")) << wrong_extent;
  EXPECT_TRUE(contains(wrong_extent, "expected shape [2, 4]")) << wrong_extent;
  EXPECT_TRUE(contains(wrong_extent, "got [2, 3] fp32 cpu")) << wrong_extent;

  const std::string wrong_rank = message_of([&] { expect_shape("attend", view, "keys", {kAnyExtent, 2, 3}); });
  EXPECT_TRUE(contains(wrong_rank, "expected shape [*, 2, 3]")) << wrong_rank;
  EXPECT_TRUE(contains(wrong_rank, "got [2, 3]")) << wrong_rank;

  const std::string absent = message_of([] { expect_shape("attend", TensorView(), "values", {4}); });
  EXPECT_TRUE(contains(absent, "'values'")) << absent;
  EXPECT_TRUE(contains(absent, "an empty tensor")) << absent;
}

TEST(ExpectChecks, DtypeMessage) {
  std::array<float, 2> data{};
  const TensorView view(data.data(), DType::fp32, {2});
  EXPECT_NO_THROW(expect_dtype("score", view, "q", {DType::fp16, DType::fp32}));
  const std::string message = message_of([&] { expect_dtype("score", view, "q", {DType::fp16, DType::bf16}); });
  EXPECT_TRUE(contains(message, "keysel::score")) << message;
  EXPECT_TRUE(contains(message, "'q'")) << message;
  EXPECT_TRUE(contains(message, "expected dtype fp16 or bf16")) << message;
  EXPECT_TRUE(contains(message, "got fp32")) << message;
}

TEST(ExpectChecks, DeviceMessage) {
  std::array<float, 2> data{};
  const TensorView on_gpu(data.data(), DType::fp32, {2}, Device::cuda(1));
  EXPECT_NO_THROW(expect_device("score", on_gpu, "k", Device::cuda(1)));
  const std::string message = message_of([&] { expect_device("score", on_gpu, "k", Device::cpu()); });
  EXPECT_TRUE(contains(message, "keysel::score")) << message;
  EXPECT_TRUE(contains(message, "'k'")) << message;
  EXPECT_TRUE(contains(message, "expected a tensor on cpu")) << message;
  EXPECT_TRUE(contains(message, "got cuda:1")) << message;
  EXPECT_THROW(expect_device("score", on_gpu, "k", Device::cuda(0)), Error);
}

TEST(ExpectChecks, WritableMessage) {
  std::array<float, 2> data{};
  const float* const_data = data.data();
  EXPECT_NO_THROW(expect_writable("select", TensorView(data.data(), DType::fp32, {2}), "out"));
  const TensorView read_only(const_data, DType::fp32, {2});
  const std::string message = message_of([&] { expect_writable("select", read_only, "out"); });
  EXPECT_TRUE(contains(message, "keysel::select")) << message;
  EXPECT_TRUE(contains(message, "'out'")) << message;
  EXPECT_TRUE(contains(message, "expected a writable tensor")) << message;
  EXPECT_TRUE(contains(message, "got a read-only view [2] fp32 cpu")) << message;
}

TEST(ExpectChecks, ContiguousMessage) {
  std::array<float, 6> data{};
  EXPECT_NO_THROW(expect_contiguous("select", TensorView(data.data(), DType::fp32, {2, 3}), "scores"));
  const std::array<std::int64_t, 2> shape = {3, 2};
  const std::array<std::int64_t, 2> strides = {1, 3};
  const TensorView transposed(data.data(), DType::fp32, shape, strides);
  const std::string message = message_of([&] { expect_contiguous("select", transposed, "scores"); });
  EXPECT_TRUE(contains(message, "keysel::select")) << message;
  EXPECT_TRUE(contains(message, "'scores'")) << message;
  EXPECT_TRUE(contains(message, "expected a contiguous tensor")) << message;
  EXPECT_TRUE(contains(message, "got [3, 2] fp32 cpu with strides [1, 3]")) << message;
}

}  // namespace
}  // namespace keysel
