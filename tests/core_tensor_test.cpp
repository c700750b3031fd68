// Tests of dtypes, shape arithmetic, aligned buffers and owning tensors.
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "nibble/dtype.hpp"
#include "nibble/error.hpp"
#include "nibble/tensor.hpp"

namespace nibble {
namespace {

struct DTypeExpectation {
  DType dtype;
  const char* name;
  std::size_t size;
};

constexpr DTypeExpectation kAllDTypes[] = {
    {DType::F64, "F64", 8},   {DType::F32, "F32", 4}, {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2}, {DType::I64, "I64", 8}, {DType::I32, "I32", 4},
    {DType::I16, "I16", 2},   {DType::I8, "I8", 1},   {DType::U64, "U64", 8},
    {DType::U32, "U32", 4},   {DType::U16, "U16", 2}, {DType::U8, "U8", 1},
    {DType::BOOL, "BOOL", 1},
};

TEST(DType, NamesAndSizesMatchSafetensors) {
  for (const DTypeExpectation& expected : kAllDTypes) {
    EXPECT_EQ(dtype_name(expected.dtype), expected.name);
    EXPECT_EQ(dtype_size(expected.dtype), expected.size) << expected.name;
  }
}

TEST(DType, NameRoundTrips) {
  for (const DTypeExpectation& expected : kAllDTypes) {
    const std::optional<DType> parsed = dtype_from_name(dtype_name(expected.dtype));
    ASSERT_TRUE(parsed.has_value()) << expected.name;
    EXPECT_EQ(*parsed, expected.dtype);
  }
}

TEST(DType, UnknownNamesAreRejected) {
  for (const char* name : {"", "f32", "F8_E4M3", "FLOAT", "F32 ", "bool"}) {
    EXPECT_FALSE(dtype_from_name(name).has_value()) << "'" << name << "'";
  }
}

TEST(DType, OutOfRangeValueThrows) {
  EXPECT_THROW(dtype_size(static_cast<DType>(200)), InvalidArgument);
  EXPECT_THROW(dtype_name(static_cast<DType>(200)), InvalidArgument);
}

TEST(Shape, NumelMultipliesExtents) {
  EXPECT_EQ(shape_numel(std::vector<std::int64_t>{}), 1);
  EXPECT_EQ(shape_numel(std::vector<std::int64_t>{7}), 7);
  EXPECT_EQ(shape_numel(std::vector<std::int64_t>{2, 3, 4}), 24);
  EXPECT_EQ(shape_numel(std::vector<std::int64_t>{5, 0, 3}), 0);
  EXPECT_EQ(shape_numel(std::vector<std::int64_t>{std::int64_t{1} << 62, 1}),
            std::int64_t{1} << 62);
}

TEST(Shape, ZeroExtentWinsOverHugeExtents) {
  const std::int64_t huge = std::int64_t{1} << 62;
  EXPECT_EQ(shape_numel(std::vector<std::int64_t>{huge, huge, 0}), 0);
}

TEST(Shape, NegativeExtentThrowsNamingShape) {
  try {
    shape_numel(std::vector<std::int64_t>{2, -3});
    FAIL() << "no exception";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("[2, -3]"), std::string::npos) << e.what();
  }
}

TEST(Shape, OverflowThrowsNamingShape) {
  const std::int64_t big = std::int64_t{1} << 32;
  try {
    shape_numel(std::vector<std::int64_t>{big, big});
    FAIL() << "no exception";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("[4294967296, 4294967296]"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(shape_numel(std::vector<std::int64_t>{std::numeric_limits<std::int64_t>::max(), 2}),
               InvalidArgument);
}

TEST(Shape, StringForm) {
  EXPECT_EQ(shape_string(std::vector<std::int64_t>{}), "[]");
  EXPECT_EQ(shape_string(std::vector<std::int64_t>{3}), "[3]");
  EXPECT_EQ(shape_string(std::vector<std::int64_t>{1, 2, 3}), "[1, 2, 3]");
}

TEST(Buffer, DefaultIsEmpty) {
  const Buffer buffer;
  EXPECT_EQ(buffer.size(), 0u);
  EXPECT_EQ(buffer.data(), nullptr);
}

TEST(Buffer, AlignedAndZeroedForManySizes) {
  for (std::size_t bytes : {std::size_t{0}, std::size_t{1}, std::size_t{63}, std::size_t{64},
                            std::size_t{65}, std::size_t{1000}, std::size_t{1} << 20}) {
    const Buffer buffer(bytes);
    EXPECT_EQ(buffer.size(), bytes);
    ASSERT_NE(buffer.data(), nullptr) << bytes;
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(buffer.data()) % Buffer::kAlignment, 0u) << bytes;
    for (std::size_t i = 0; i < bytes; ++i) {
      ASSERT_EQ(buffer.data()[i], std::byte{0}) << "byte " << i << " of " << bytes;
    }
  }
}

TEST(Buffer, MoveTransfersOwnership) {
  Buffer source(128);
  source.data()[5] = std::byte{42};
  const std::byte* memory = source.data();
  const Buffer target = std::move(source);
  EXPECT_EQ(target.data(), memory);
  EXPECT_EQ(target.size(), 128u);
  EXPECT_EQ(target.data()[5], std::byte{42});
}

TEST(Tensor, DefaultIsEmpty) {
  const Tensor tensor;
  EXPECT_EQ(tensor.numel(), 0);
  EXPECT_EQ(tensor.nbytes(), 0u);
  EXPECT_TRUE(tensor.shape().empty());
}

TEST(Tensor, SizesFollowShapeAndDType) {
  const Tensor matrix(DType::F32, {3, 5});
  EXPECT_EQ(matrix.dtype(), DType::F32);
  EXPECT_EQ(matrix.shape(), (std::vector<std::int64_t>{3, 5}));
  EXPECT_EQ(matrix.numel(), 15);
  EXPECT_EQ(matrix.nbytes(), 60u);

  const Tensor scalar(DType::F64, {});
  EXPECT_EQ(scalar.numel(), 1);
  EXPECT_EQ(scalar.nbytes(), 8u);

  const Tensor empty(DType::BF16, {4, 0});
  EXPECT_EQ(empty.numel(), 0);
  EXPECT_EQ(empty.nbytes(), 0u);
}

TEST(Tensor, ZeroFilledAndAligned) {
  Tensor tensor(DType::I32, {17});
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(tensor.data()) % Buffer::kAlignment, 0u);
  for (std::int64_t i = 0; i < tensor.numel(); ++i) EXPECT_EQ(tensor.data_as<std::int32_t>()[i], 0);
  tensor.data_as<std::int32_t>()[16] = -7;
  EXPECT_EQ(static_cast<const Tensor&>(tensor).data_as<std::int32_t>()[16], -7);
}

TEST(Tensor, BadShapesThrow) {
  EXPECT_THROW(Tensor(DType::F32, {-1}), InvalidArgument);
  // The element count fits int64 but the byte count does not.
  EXPECT_THROW(Tensor(DType::F64, {std::int64_t{1} << 61}), InvalidArgument);
}

}  // namespace
}  // namespace nibble
