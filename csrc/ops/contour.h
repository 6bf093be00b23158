// contour_mine and contour_band: the math shared by the CPU and CUDA kernels (DESIGN 2.2).
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "ops/common.h"

// The mask dtypes both backends read directly (no float copy of the mask).
#define FASTIML_DISPATCH_MASK(TYPE, NAME, ...)                                             \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kBool, __VA_ARGS__)                 \
                     AT_DISPATCH_CASE(at::kByte, __VA_ARGS__)                              \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                             \
                     AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__)                            \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                              \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace FASTIML_NAMESPACE {
namespace contour {

// Patch classes (int8): a cell with no valid pixel is padding.
constexpr int8_t kPadding = -1;
constexpr int8_t kAuthentic = 0;
constexpr int8_t kTampered = 1;
constexpr int8_t kContour = 2;

// How much one mask pixel counts as tampered. uint8 masks are 0/1 or 0/255 (any non-zero value
// is tampered); float masks are soft, in [0, 1].
FASTIML_HD float tampered_weight(bool v) { return v ? 1.0f : 0.0f; }
FASTIML_HD float tampered_weight(uint8_t v) { return v != 0 ? 1.0f : 0.0f; }
FASTIML_HD float tampered_weight(float v) { return v; }
FASTIML_HD float tampered_weight(double v) { return static_cast<float>(v); }

// Which side of the boundary a pixel lies on, for contour_band (soft masks split at 0.5).
template <typename T>
FASTIML_HD bool is_tampered(T v) {
  return tampered_weight(v) >= 0.5f;
}
FASTIML_HD bool is_tampered(double v) { return v >= 0.5; }  // no float32 rounding first

// A mask value in a type the overloads above take: half types through float, others as is
// (float64 stays float64, so is_tampered splits it at 0.5 exactly).
template <typename T>
FASTIML_HD auto readable(T v) {
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>)
    return static_cast<float>(v);
  else
    return v;
}

// Masks whose pixels are 0 or 1 tampered (bool, uint8): both backends count their cells in
// integers, so the order of the additions cannot change a result.
template <typename T>
inline constexpr bool kBinaryMask = std::is_same_v<T, bool> || std::is_same_v<T, uint8_t>;

// Tampered fraction of a cell: 0 when it has no valid pixel.
FASTIML_HD float cell_fraction(float tampered_sum, int64_t valid_count) {
  return valid_count > 0 ? tampered_sum / static_cast<float>(valid_count) : 0.0f;
}

FASTIML_HD int8_t classify_cell(float frac, int64_t valid_count, float lo, float hi) {
  if (valid_count == 0) return kPadding;
  if (frac <= lo) return kAuthentic;
  if (frac >= hi) return kTampered;
  return kContour;
}

// The grid of p x p cells over an extent: the last cell may be partial.
FASTIML_HD int64_t cells(int64_t extent, int64_t patch) { return (extent + patch - 1) / patch; }

}  // namespace contour
}  // namespace fastiml
