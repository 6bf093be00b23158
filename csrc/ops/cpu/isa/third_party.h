// Every header outside fastiml that the CPU kernels include, for the variants (avx2.cpp,
// avx512.cpp) to include before their target pragma (see kernels.h). A kernel that includes a
// new std / c10 / ATen header must add it here.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#define FASTIML_CPU_THIRD_PARTY_INCLUDED 1
