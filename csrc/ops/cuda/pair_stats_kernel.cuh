// pair_stats on the GPU: device code (the launch logic is in pair_stats_kernel.cu).
//
// Tiles, threads and shared memory
// --------------------------------
// A thread block of 128 threads (4 warps) owns a tile of kBM = 64 rows and walks column tiles of
// kBN = 64 (the backward's second pass swaps the roles): those its work item lists in the tile
// schedule of ops/pair_stats.h -- only tiles that share a group with its rows, and, when
// a pass would have fewer than ~2 blocks per SM, one of `splits` runs of them (the forward
// writes a partial log-sum-exp state per split, merged in split order by
// pair_stats_merge_kernel; the backward a partial gradient tile per split, summed in split
// order by pair_stats_backward_merge_kernel). For each tile it forms the
// 64 x 64 similarity tile S = Q_tile K_tile^T in shared memory, looping over D in chunks, so any
// D works (rows and D past the end are zero-padded in shared memory):
//  * float16 / bfloat16: tensor cores through nvcuda::wmma 16x16x16 with float accumulators; the
//    4 warps form a 2 x 2 grid of 32 x 32 sub-tiles (2 x 2 fragments each); D chunk 32, operand
//    tiles [64][40] (8 halves of skew against bank conflicts);
//  * float32 / float64 (and bfloat16 before sm_80, which has no bf16 tensor cores): a SIMT
//    register-tiled product, 8 x 4 outputs per thread, operands transposed in shared memory
//    ([chunk][65], conflict-free); D chunk 32 (float) or 8 (double).
// The epilogue gives each row two threads (adjacent lanes) with 32 columns each; every thread
// keeps the online log-sum-exp state (running max m, sum l, in registers) and the positive sum and
// count of its half-row, and the two halves are merged with one shuffle at the end. The columns
// of a thread are interleaved and rotated (jj = 2 ((c + r/8) mod 32) + part) so that the 32 lanes
// of a warp read 32 distinct banks of S (row stride 68 floats: 68 = 4 mod 32).
//
// Backward recomputes each tile from the saved lse, turns it into G (DESIGN 2.1) and multiplies:
// dq = G K / tau in one kernel whose blocks own row tiles and walk column tiles, dk = G^T Q / tau
// in a second kernel whose blocks own column tiles and walk row tiles: every output element is
// written by exactly one block, no atomics, deterministic. A block owns kDV = 128 gradient columns
// (64 for double); larger D adds blocks along grid.y, each recomputing S (the recompute is then
// D / kDV times the forward's work: D <= 128, the common case, recomputes once). Computing S once
// for all of D would need the block's whole [64 x D] accumulator alive across its walk: at
// D = 512 that is 128 KiB -- 4x the registers the tensor-core backward already fills, so either
// shared memory (one block per SM) or a read-modify-write of a global float32 tile per tile pair
// (~16 FLOP per byte of L2 traffic, against ~180 that keep the tensor cores busy). Whether either
// beats the recompute (2.5x the ideal work at D = 512) needs a GPU measurement. On tensor cores G
// is rounded to the input dtype (as FlashAttention does with P); it is first scaled by a power of
// two 2^(15 - e), 2^e > |dL/dlse_i| + |dL/dpos_mean_i| / count_i >= max_j |G_ij| -- per row i in
// the dq pass (undone per output row), per row tile in the dk pass (whose sums run over rows:
// the float32 accumulator is rescaled by 2^(e_new - e_old) between row tiles, with a cap that
// keeps the sums so far in float32's range; TileRangeScale in ops/pair_stats.h) -- so float16
// neither overflows nor flushes a row tile's small probabilities to zero (every scale is a power
// of two, undone exactly).
//
// Shared memory per block (bytes; all under the 48 KiB static limit, so no opt-in is needed):
//                       S tile   operands (union)  G tile   codes   total
//   fp16/bf16 forward   17408    10240             -        512     28160
//   fp16/bf16 backward  17408    17408             9216     512     44544
//   fp32 fwd / bwd      17408    16640             -        512     34560
//   fp64 fwd / bwd      34816     8320             -        512     43648
// The budget is set by the backward's second product on tensor cores (a 64 x 128 operand tile in
// 16-bit plus the 64 x 64 G tile) and by the float accumulator tile S, kept in shared memory so
// that the epilogue can give each thread whole half-rows. Registers (ptxas, sm_80): the tensor-core
// backward holds 2 x 4 accumulator fragments (64 floats per thread) across its whole walk plus
// 2 x 2 for S, and uses 202-212 registers (no spill; CUDA 13.0, see the README's table); the
// forward holds 32 shifted similarities per thread in the epilogue and uses 80-128. That is 2
// blocks (8 warps) per SM for the tensor-core backward and 4 for the forward on sm_80/sm_90,
// which their shared memory also allows (2 x 44.5 KiB, 4 x 27.5 KiB < 164 KiB on sm_80). Not
// done yet (known next steps): cp.async double buffering (each D chunk is loaded, synchronised
// and multiplied in turn), exp2 with a pre-scaled log2(e), and the symmetric (upper-triangular)
// schedule in self mode, which the CPU kernel uses: a tile's mirrored (column) sums belong to
// rows another block owns, and adding them deterministically takes a fixed-order partial buffer
// per contributing block (see the README: the split's partial buffers are bounded by the split
// count, the symmetric schedule's would grow with N).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "ops/pair_stats.h"

namespace fastiml {
namespace pair_stats {
namespace gpu {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 64;             // rows per tile
constexpr int kBN = 64;             // columns per tile
constexpr int kLdS = kBN + 4;       // row stride of S: a multiple of 4 (wmma), 4 mod 32 (banks)
constexpr int kColsPerThread = kBN / 2;
// A row group no column has: rows past the end never count anything.
constexpr int32_t kNoRow = INT32_MIN;

static_assert(kBM == kBN, "the backward uses the same tile for both passes");
static_assert(kThreads == 2 * kBM, "the epilogue gives each row two threads");

constexpr int round_up(int x, int to) { return (x + to - 1) / to * to; }
constexpr int max_of(int a, int b) { return a > b ? a : b; }

// The CUDA type wmma names for a c10 16-bit type.
template <typename T>
struct MmaType {
  using type = T;
};
template <>
struct MmaType<c10::Half> {
  using type = __half;
};
template <>
struct MmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t, bool kWmma>
struct Config {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  static constexpr bool kDouble = sizeof(acc_t) == 8;
  // Element type of the operand tiles in shared memory: the input dtype for tensor cores, else
  // the accumulation dtype (converted once, at the load).
  using op_t = std::conditional_t<kWmma, scalar_t, acc_t>;
  static_assert(!kWmma || sizeof(scalar_t) == 2, "tensor cores take 16-bit inputs here");

  static constexpr int kBK = kWmma ? 32 : (kDouble ? 8 : 32);  // D chunk of S = Q K^T
  static constexpr int kDV = kDouble ? 64 : 128;               // gradient columns per block
  static constexpr int kBX = kWmma ? kBN : (kDouble ? 8 : 32);  // rows per chunk of G X (SIMT)
  // Operand tiles of S: tensor cores [64][kBK + 8] row-major, SIMT [kBK][65] transposed.
  static constexpr int kLdK = kWmma ? kBK + 8 : kBM + 1;
  static constexpr int kLdX = kWmma ? kDV + 8 : kDV;  // X tile of the gradient product
  static constexpr int kLdG = kBN + 8;                // G tile in 16-bit (tensor cores only)

  static constexpr int kSBytes = kBM * kLdS * int(sizeof(acc_t));
  static constexpr int kQKBytes =
      round_up((kWmma ? 2 * kBM * kLdK : 2 * kBK * kLdK) * int(sizeof(op_t)), 128);
  static constexpr int kXBytes = (kWmma ? kBN : kBX) * kLdX * int(sizeof(op_t));
  static constexpr int kStageBytes = kWmma ? kWarps * 16 * 16 * int(sizeof(float)) : 0;
  static constexpr int kUBytes = round_up(max_of(kQKBytes, max_of(kXBytes, kStageBytes)), 128);
  static constexpr int kGBytes = kWmma ? round_up(kBM * kLdG * int(sizeof(scalar_t)), 128) : 0;
  static constexpr int kCodeBytes = 2 * kBN * int(sizeof(int32_t));
  static constexpr int kForwardBytes = kSBytes + kQKBytes + kCodeBytes;
  static constexpr int kBackwardBytes = kSBytes + kUBytes + kGBytes + kCodeBytes;
  static_assert(kSBytes % 128 == 0, "shared-memory sections stay 128-byte aligned");
  static_assert(kBackwardBytes <= 48 * 1024 && kForwardBytes <= 48 * 1024,
                "static shared memory is limited to 48 KiB");
};

// What forward and backward both read: the embeddings, their codes and the options.
template <typename scalar_t, typename acc_t>
struct PairInputs {
  const scalar_t* q;  // [n, d], contiguous
  const scalar_t* k;  // [m, d], contiguous (q in self mode)
  const int32_t* row_label;
  const int32_t* row_group;
  const int32_t* col_label;
  const int32_t* col_group;
  int64_t n, m, d;
  acc_t inv_tau;
  bool exclude_self, negatives_only;
  bool vec;  // 16-byte loads: d % 8 == 0 and q, k 16-byte aligned (16-bit inputs only)
};

// A pass's tile schedule (schedule_splits and TileCursor in ops/pair_stats.h), on the device:
// block b is work item b; it owns tile b / splits and walks the other tiles its TileCursor
// yields, found from the per-tile group ranges alone (O(tiles) memory, no list of pairs).
struct ScheduleView {
  const GroupRange* own;    // [own tiles]
  const GroupRange* other;  // [other tiles]
  int64_t other_tiles, splits;
  __device__ __forceinline__ TileCursor cursor(int64_t item) const {
    return TileCursor(own, other, other_tiles, item, splits, /*upper_only=*/false);
  }
};

// The GroupRange of each tile of `tile` entries of groups[0, n): one thread per tile.
__global__ void tile_group_ranges_kernel(const int32_t* groups, int64_t n, int64_t tile,
                                         int64_t tiles, GroupRange* ranges) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < tiles;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    GroupRange range;
    const int64_t end = (t + 1) * tile < n ? (t + 1) * tile : n;
    for (int64_t i = t * tile; i < end; ++i) range.add(groups[i]);
    ranges[t] = range;
  }
}

template <typename scalar_t, typename acc_t>
struct ForwardParams : PairInputs<scalar_t, acc_t> {
  ScheduleView schedule;
  // Per split s and row i (index s * n + i): the partial online log-sum-exp state and the
  // positive sums over that split's column tiles; pair_stats_merge_kernel combines them.
  acc_t* part_max;
  acc_t* part_sum;
  acc_t* part_pos_sum;
  int64_t* part_pos_count;
};

template <typename acc_t>
struct MergeParams {
  const acc_t* part_max;
  const acc_t* part_sum;
  const acc_t* part_pos_sum;
  const int64_t* part_pos_count;
  int64_t n, splits;
  acc_t* lse;
  acc_t* pos_mean;
  int64_t* pos_count;
};

template <typename scalar_t, typename acc_t>
struct BackwardParams : PairInputs<scalar_t, acc_t> {
  ScheduleView schedule;       // own tiles (rows for dq, columns for dk), maybe split
  const acc_t* grad_lse;       // [n]
  const acc_t* grad_pos_mean;  // [n]
  const acc_t* lse;            // [n]
  const int64_t* pos_count;    // [n]
  const float* q_max;     // dk on tensor cores: max_ij |q_ij| (one float on the device)
  // splits > 1: each item writes its partial gradient tile to part[split] ([splits, own, d]),
  // summed in split order by pair_stats_backward_merge_kernel; else the item writes the result:
  acc_t* part;
  const acc_t* add_in;    // optional [own, d]: added to the result (self mode's second pass)
  acc_t* out_acc;         // either: the result in the accumulation dtype ...
  scalar_t* out;          // ... or in the input dtype
};

template <typename scalar_t, typename acc_t>
struct BackwardMergeParams {
  const acc_t* part;  // [splits, numel]
  int64_t numel, splits;
  const acc_t* add_in;
  acc_t* out_acc;
  scalar_t* out;
};

// --------------------------------------------------------------------------- loads

// Column codes of the tile [c0, c0 + kBN) into shared memory; columns past m get the group
// kIgnored, which no counted row has.
__device__ __forceinline__ void load_column_codes(int32_t* cl, int32_t* cg, const int32_t* label,
                                                  const int32_t* group, int64_t c0, int64_t m) {
  const int t = threadIdx.x;
  if (t < kBN) {
    const int64_t col = c0 + t;
    cl[t] = col < m ? label[col] : 0;
    cg[t] = col < m ? group[col] : kIgnored;
  }
}

// A [kRows][kCols] tile of 16-bit values, rows [base, base + kRows) and columns [d0, d0 + kCols)
// of the row-major [rows, d] matrix src, into dst (row stride kLd); zero outside the matrix.
template <int kRows, int kCols, int kLd, typename scalar_t>
__device__ __forceinline__ void load_tile_16bit(scalar_t* dst, const scalar_t* src, int64_t base,
                                                int64_t rows, int64_t d, int64_t d0, bool vec) {
  static_assert(sizeof(scalar_t) == 2 && kCols % 8 == 0 && kLd % 8 == 0, "16-byte vectors");
  if (vec) {  // d % 8 == 0: a vector is either wholly inside the row or wholly past it
    constexpr int kVecs = kCols / 8;
    for (int e = threadIdx.x; e < kRows * kVecs; e += kThreads) {
      const int r = e / kVecs, c = (e % kVecs) * 8;
      const int64_t row = base + r, col = d0 + c;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (row < rows && col < d) v = *reinterpret_cast<const uint4*>(src + row * d + col);
      *reinterpret_cast<uint4*>(dst + r * kLd + c) = v;
    }
  } else {
    for (int e = threadIdx.x; e < kRows * kCols; e += kThreads) {
      const int r = e / kCols, c = e % kCols;
      const int64_t row = base + r, col = d0 + c;
      dst[r * kLd + c] = (row < rows && col < d) ? src[row * d + col] : scalar_t(0.0f);
    }
  }
}

// --------------------------------------------------------------------------- S = Q K^T

// The [kBM][kBN] tile S[r][c] = <q[r0 + r], k[c0 + c]> (unscaled) into shared memory (row
// stride kLdS). Uses `u` for the operand tiles. All threads must call it; the caller
// synchronises before reading S.
template <typename scalar_t, bool kWmma>
__device__ __forceinline__ void similarity_tile(
    typename Config<scalar_t, kWmma>::acc_t* S, unsigned char* u, const scalar_t* q, int64_t r0,
    int64_t n, const scalar_t* k, int64_t c0, int64_t m, int64_t d, bool vec) {
  using C = Config<scalar_t, kWmma>;
  using acc_t = typename C::acc_t;
  using op_t = typename C::op_t;
  const int tid = threadIdx.x;
  if constexpr (kWmma) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      __trap();  // never launched: the host picks the SIMT path for bf16 before sm_80
    } else
#endif
    {
      namespace wmma = nvcuda::wmma;
      using mma_t = typename MmaType<scalar_t>::type;
      op_t* qs = reinterpret_cast<op_t*>(u);
      op_t* ks = qs + kBM * C::kLdK;
      const int warp = tid / 32, wr = warp >> 1, wc = warp & 1;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
      for (int64_t d0 = 0; d0 < d; d0 += C::kBK) {
        load_tile_16bit<kBM, C::kBK, C::kLdK>(qs, q, r0, n, d, d0, vec);
        load_tile_16bit<kBN, C::kBK, C::kLdK>(ks, k, c0, m, d, d0, vec);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < C::kBK; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, mma_t, wmma::row_major> a[2];
          wmma::fragment<wmma::matrix_b, 16, 16, 16, mma_t, wmma::col_major> b[2];
#pragma unroll
          for (int i = 0; i < 2; ++i)
            wmma::load_matrix_sync(
                a[i], reinterpret_cast<const mma_t*>(qs + (wr * 32 + i * 16) * C::kLdK + kk),
                C::kLdK);
          // K^T in column-major order is K in row-major order.
#pragma unroll
          for (int j = 0; j < 2; ++j)
            wmma::load_matrix_sync(
                b[j], reinterpret_cast<const mma_t*>(ks + (wc * 32 + j * 16) * C::kLdK + kk),
                C::kLdK);
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::store_matrix_sync(S + (wr * 32 + i * 16) * kLdS + wc * 32 + j * 16, acc[i][j],
                                  kLdS, wmma::mem_row_major);
    }
  } else {
    // Thread (ty, tx) computes rows ty + 8 i (i < 8) and columns tx + 16 j (j < 4).
    op_t* as = reinterpret_cast<op_t*>(u);  // as[kk][r] = q[r0 + r][d0 + kk]
    op_t* bs = as + C::kBK * C::kLdK;       // bs[kk][c] = k[c0 + c][d0 + kk]
    const int tx = tid & 15, ty = tid >> 4;
    acc_t acc[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);
    for (int64_t d0 = 0; d0 < d; d0 += C::kBK) {
      for (int e = tid; e < kBM * C::kBK; e += kThreads) {
        const int r = e / C::kBK, kk = e % C::kBK;
        const int64_t col = d0 + kk, qrow = r0 + r, krow = c0 + r;
        as[kk * C::kLdK + r] =
            (qrow < n && col < d) ? static_cast<acc_t>(q[qrow * d + col]) : acc_t(0);
        bs[kk * C::kLdK + r] =
            (krow < m && col < d) ? static_cast<acc_t>(k[krow * d + col]) : acc_t(0);
      }
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < C::kBK; ++kk) {
        acc_t a[8], b[4];
#pragma unroll
        for (int i = 0; i < 8; ++i) a[i] = as[kk * C::kLdK + ty + 8 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = bs[kk * C::kLdK + tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) S[(ty + 8 * i) * kLdS + tx + 16 * j] = acc[i][j];
  }
}

// The column of S that a thread visits c-th: interleaved between the two threads of a row and
// rotated by r / 8, so that a warp's 32 lanes read 32 distinct banks (see the top of the file).
__device__ __forceinline__ int epilogue_column(int r, int part, int c) {
  return 2 * ((c + (r >> 3)) & (kColsPerThread - 1)) + part;
}

// --------------------------------------------------------------------------- forward

template <typename scalar_t, bool kWmma>
__global__ void __launch_bounds__(kThreads)
    pair_stats_forward_kernel(ForwardParams<scalar_t, typename Config<scalar_t, kWmma>::acc_t> p) {
  using C = Config<scalar_t, kWmma>;
  using acc_t = typename C::acc_t;
  __shared__ __align__(128) unsigned char smem[C::kForwardBytes];
  acc_t* S = reinterpret_cast<acc_t*>(smem);
  unsigned char* u = smem + C::kSBytes;
  int32_t* cl = reinterpret_cast<int32_t*>(smem + C::kSBytes + C::kQKBytes);
  int32_t* cg = cl + kBN;

  const int tid = threadIdx.x, r = tid >> 1, part = tid & 1;
  const int64_t item = blockIdx.x, split = item % p.schedule.splits;
  const int64_t r0 = (item / p.schedule.splits) * kBM;
  const int64_t row = r0 + r;
  const bool in_range = row < p.n;
  const int32_t li = in_range ? p.row_label[row] : 0;
  const int32_t g = in_range ? p.row_group[row] : kIgnored;
  const int32_t gi = g >= 0 ? g : kNoRow;  // ignored rows and rows past n count nothing

  acc_t m_run = neg_inf<acc_t>(), l_run = acc_t(0), pos_sum = acc_t(0);
  int64_t pos_count = 0;
  TileCursor cursor = p.schedule.cursor(item);
  for (int64_t tile; cursor.next(tile);) {
    const int64_t c0 = tile * kBN;
    load_column_codes(cl, cg, p.col_label, p.col_group, c0, p.m);
    similarity_tile<scalar_t, kWmma>(S, u, p.q, r0, p.n, p.k, c0, p.m, p.d, p.vec);
    __syncthreads();
    acc_t v[kColsPerThread];
    acc_t tile_max = neg_inf<acc_t>();
    int32_t tile_count = 0;
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) {
      const int jj = epilogue_column(r, part, c);
      const acc_t s = S[r * kLdS + jj] * p.inv_tau;
      const PairMask pm =
          pair_mask(li, gi, cl[jj], cg[jj], p.exclude_self && row == c0 + jj, p.negatives_only);
      pos_sum += pm.pos ? s : acc_t(0);
      tile_count += pm.pos;
      v[c] = pm.den ? s : neg_inf<acc_t>();
      tile_max = v[c] > tile_max ? v[c] : tile_max;
    }
    pos_count += tile_count;
    if (tile_max > neg_inf<acc_t>()) {  // else nothing of this tile is in the denominator
      lse_raise_max(m_run, l_run, tile_max);
      acc_t sum = acc_t(0);
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) sum += exp_acc(v[c] - m_run);  // exp(-inf) = 0
      l_run += sum;
    }
    __syncthreads();  // S and the codes are rewritten by the next tile
  }
  // Merge the two half-rows (lanes 2i and 2i + 1 of the same warp).
  const acc_t m2 = __shfl_xor_sync(0xffffffffu, m_run, 1);
  const acc_t l2 = __shfl_xor_sync(0xffffffffu, l_run, 1);
  const acc_t s2 = __shfl_xor_sync(0xffffffffu, pos_sum, 1);
  const int64_t n2 = __shfl_xor_sync(0xffffffffu, pos_count, 1);
  lse_merge(m_run, l_run, m2, l2);
  pos_sum += s2;
  pos_count += n2;
  if (part == 0 && in_range) {
    const int64_t index = split * p.n + row;
    p.part_max[index] = m_run;
    p.part_sum[index] = l_run;
    p.part_pos_sum[index] = pos_sum;
    p.part_pos_count[index] = pos_count;
  }
}

// The statistics of each row from its splits' partial states, merged in split order (fixed:
// deterministic). One thread per row.
template <typename acc_t>
__global__ void pair_stats_merge_kernel(MergeParams<acc_t> p) {
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < p.n;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t m = neg_inf<acc_t>(), l = acc_t(0), pos_sum = acc_t(0);
    int64_t pos_count = 0;
    for (int64_t s = 0; s < p.splits; ++s) {
      const int64_t index = s * p.n + row;
      lse_merge(m, l, p.part_max[index], p.part_sum[index]);
      pos_sum += p.part_pos_sum[index];
      pos_count += p.part_pos_count[index];
    }
    p.lse[row] = lse_finish(m, l);
    p.pos_mean[row] = pos_count > 0 ? pos_sum / acc_t(pos_count) : acc_t(0);
    p.pos_count[row] = pos_count;
  }
}

// --------------------------------------------------------------------------- backward

// The bound of row i's G entries, |G_ij| <= |a_i| + |b_i|, that sets their range scale.
template <typename acc_t>
__device__ __forceinline__ float row_gradient_bound(const RowGrad<acc_t>& g) {
  return static_cast<float>(fabs(g.a) + fabs(g.b));
}

// The largest of one value per thread, in every thread of the block. `slots`: kWarps floats of
// shared memory; the caller synchronises between this call's writes and read_block_max.
__device__ __forceinline__ void write_warp_max(float* slots, float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if ((threadIdx.x & 31) == 0) slots[threadIdx.x / 32] = v;
}
__device__ __forceinline__ float read_block_max(const float* slots) {
  float v = slots[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) v = fmaxf(v, slots[w]);
  return v;
}

// Output element `index` (= row * d + col) of the gradient, v = the item's sum, unscaled: into
// the item's partial buffer when the schedule splits, else the result (+ add_in) in the
// requested dtype.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_gradient(const BackwardParams<scalar_t, acc_t>& p,
                                               int64_t split, int64_t own_len, int64_t index,
                                               acc_t v) {
  if (p.part != nullptr) {
    p.part[split * own_len * p.d + index] = v;
    return;
  }
  if (p.add_in != nullptr) v += p.add_in[index];
  if (p.out_acc != nullptr)
    p.out_acc[index] = v;
  else
    p.out[index] = static_cast<scalar_t>(v);
}

// The gradient from the split items' partial buffers, summed in split order (deterministic).
template <typename scalar_t, typename acc_t>
__global__ void pair_stats_backward_merge_kernel(BackwardMergeParams<scalar_t, acc_t> p) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < p.numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t v = p.part[e];
    for (int64_t s = 1; s < p.splits; ++s) v += p.part[s * p.numel + e];
    if (p.add_in != nullptr) v += p.add_in[e];
    if (p.out_acc != nullptr)
      p.out_acc[e] = v;
    else
      p.out[e] = static_cast<scalar_t>(v);
  }
}

// kForK = false: blocks own row tiles, grad = G K / tau (dq). kForK = true: blocks own column
// tiles, grad = G^T Q / tau (dk). grid = (work items: own tiles x splits, ceil(d / kDV)).
template <typename scalar_t, bool kWmma, bool kForK>
__global__ void __launch_bounds__(kThreads) pair_stats_backward_kernel(
    BackwardParams<scalar_t, typename Config<scalar_t, kWmma>::acc_t> p) {
  using C = Config<scalar_t, kWmma>;
  using acc_t = typename C::acc_t;
  using op_t = typename C::op_t;
  __shared__ __align__(128) unsigned char smem[C::kBackwardBytes];
  acc_t* S = reinterpret_cast<acc_t*>(smem);
  unsigned char* u = smem + C::kSBytes;
  scalar_t* G = reinterpret_cast<scalar_t*>(smem + C::kSBytes + C::kUBytes);  // tensor cores
  int32_t* cl = reinterpret_cast<int32_t*>(smem + C::kSBytes + C::kUBytes + C::kGBytes);
  int32_t* cg = cl + kBN;
  __shared__ float warp_bounds[kWarps];  // dk on tensor cores: the row tile's largest |G| bound

  const int tid = threadIdx.x, r = tid >> 1, part = tid & 1;
  const int64_t item = blockIdx.x, split = item % p.schedule.splits;
  const int64_t own0 = (item / p.schedule.splits) * kBM;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * C::kDV;
  const int64_t own_len = kForK ? p.m : p.n, other_len = kForK ? p.n : p.m;
  const scalar_t* X = kForK ? p.q : p.k;  // the matrix G (or G^T) multiplies
  // Range scale of the 16-bit G tiles: dq (blocks own rows) scales each row by its own bound
  // |a_i| + |b_i| -- exact to undo per output row, and no small row is flushed to zero by a
  // large one; dk (blocks own columns, summing over rows) scales each row tile by its own
  // bound, rescaling the accumulator between tiles (TileRangeScale in ops/pair_stats.h).
  constexpr bool kTileScale = kWmma && kForK;
  [[maybe_unused]] const float q_max = kTileScale ? *p.q_max : 0.0f;
  TileRangeScale tile_scale;

  // Accumulators of the [kBM][kDV] gradient tile.
  [[maybe_unused]] acc_t acc2[8][C::kDV / 16];  // SIMT: rows ty + 8 i, columns tx + 16 j
  if constexpr (!kWmma) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < C::kDV / 16; ++j) acc2[i][j] = acc_t(0);
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  constexpr bool kTensorCores = kWmma && !std::is_same_v<scalar_t, c10::BFloat16>;
  if constexpr (kWmma && !kTensorCores) {
    __trap();  // never launched: the host picks the SIMT path for bf16 before sm_80
    return;
  }
#else
  constexpr bool kTensorCores = kWmma;
#endif
  namespace wmma = nvcuda::wmma;
  using mma_t = typename MmaType<scalar_t>::type;
  using frag_acc = std::conditional_t<kTensorCores,
                                      wmma::fragment<wmma::accumulator, 16, 16, 16, float>, int>;
  [[maybe_unused]] frag_acc facc[2][4];  // tensor cores: warp (wr, wc) owns rows 32 wr + 16 i,
                                         // columns 64 wc + 16 j of the gradient tile
  const int warp = tid / 32, wr = warp >> 1, wc = warp & 1;
  if constexpr (kTensorCores) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) wmma::fill_fragment(facc[i][j], 0.0f);
  }

  TileCursor cursor = p.schedule.cursor(item);
  for (int64_t tile; cursor.next(tile);) {
    const int64_t x0 = tile * kBN;
    const int64_t r0 = kForK ? x0 : own0, c0 = kForK ? own0 : x0;
    load_column_codes(cl, cg, p.col_label, p.col_group, c0, p.m);
    // This thread's row of the tile and its backward factors.
    const int64_t row = r0 + r;
    const bool in_range = row < p.n;
    const int32_t li = in_range ? p.row_label[row] : 0;
    const int32_t g = in_range ? p.row_group[row] : kIgnored;
    const int32_t gi = g >= 0 ? g : kNoRow;
    const RowGrad<acc_t> rg =
        in_range ? row_grad(p.grad_lse[row], p.lse[row], p.grad_pos_mean[row], p.pos_count[row])
                 : RowGrad<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
    if constexpr (kTileScale) write_warp_max(warp_bounds, row_gradient_bound(rg));

    similarity_tile<scalar_t, kWmma>(S, u, p.q, r0, p.n, p.k, c0, p.m, p.d, p.vec);
    __syncthreads();
    acc_t scale = acc_t(1);  // G's range scale for this thread's row
    if constexpr (kTileScale) {
      const int previous = tile_scale.exponent;
      const int exponent = tile_scale.next(read_block_max(warp_bounds), q_max, kBM);
      scale = ldexpf(1.0f, exponent);
      if constexpr (kTensorCores) {
        if (exponent != previous) {  // block-uniform: the sums so far into the new units
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
              for (int e = 0; e < facc[i][j].num_elements; ++e)
                facc[i][j].x[e] = ldexpf(facc[i][j].x[e], exponent - previous);
        }
      }
    } else if constexpr (kWmma) {
      scale = ldexpf(1.0f, gradient_exponent(row_gradient_bound(rg)));
    }
    // G (times the range scale on tensor cores); masks exclude rows and columns past the ends.
#pragma unroll 8
    for (int c = 0; c < kColsPerThread; ++c) {
      const int jj = epilogue_column(r, part, c);
      const acc_t s = S[r * kLdS + jj] * p.inv_tau;
      const PairMask pm =
          pair_mask(li, gi, cl[jj], cg[jj], p.exclude_self && row == c0 + jj, p.negatives_only);
      const acc_t gij = pair_grad(s, rg, pm);
      if constexpr (kWmma)
        G[r * C::kLdG + jj] = static_cast<scalar_t>(static_cast<float>(gij * scale));
      else
        S[r * kLdS + jj] = gij;  // in place: only this thread reads this entry
    }
    __syncthreads();

    // The gradient tile += G X_tile (dq) or G^T X_tile (dk),
    // X_tile = X[x0 : x0 + 64, d0 : d0 + kDV].
    if constexpr (kTensorCores) {
      op_t* xs = reinterpret_cast<op_t*>(u);
      load_tile_16bit<kBN, C::kDV, C::kLdX>(xs, X, x0, other_len, p.d, d0, p.vec);
      __syncthreads();
      using a_layout = std::conditional_t<kForK, wmma::col_major, wmma::row_major>;
#pragma unroll
      for (int kk = 0; kk < kBN; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, mma_t, a_layout> a[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          // dq: rows of G; dk: rows of G^T = columns of G, read column-major from G.
          const scalar_t* ga = kForK ? G + kk * C::kLdG + wr * 32 + i * 16
                                     : G + (wr * 32 + i * 16) * C::kLdG + kk;
          wmma::load_matrix_sync(a[i], reinterpret_cast<const mma_t*>(ga), C::kLdG);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (d0 + wc * 64 + j * 16 >= p.d) continue;  // warp-uniform: columns past d
          wmma::fragment<wmma::matrix_b, 16, 16, 16, mma_t, wmma::row_major> b;
          wmma::load_matrix_sync(
              b, reinterpret_cast<const mma_t*>(xs + kk * C::kLdX + wc * 64 + j * 16), C::kLdX);
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::mma_sync(facc[i][j], a[i], b, facc[i][j]);
        }
      }
    } else if constexpr (!kWmma) {
      op_t* xs = reinterpret_cast<op_t*>(u);  // xs[kk][c] = X[x0 + x + kk][d0 + c]
      const int tx = tid & 15, ty = tid >> 4;
      for (int x = 0; x < kBN; x += C::kBX) {
        if (x > 0) __syncthreads();  // the previous chunk is consumed
        for (int e = tid; e < C::kBX * C::kDV; e += kThreads) {
          const int kk = e / C::kDV, c = e % C::kDV;
          const int64_t xrow = x0 + x + kk, col = d0 + c;
          xs[kk * C::kLdX + c] =
              (xrow < other_len && col < p.d) ? static_cast<acc_t>(X[xrow * p.d + col]) : acc_t(0);
        }
        __syncthreads();
#pragma unroll 4
        for (int kk = 0; kk < C::kBX; ++kk) {
          const int xi = x + kk;  // index within the other tile
          acc_t a[8], b[C::kDV / 16];
#pragma unroll
          for (int i = 0; i < 8; ++i)  // dq: G[own][xi]; dk: G^T[own][xi] = G[xi][own]
            a[i] = kForK ? S[xi * kLdS + ty + 8 * i] : S[(ty + 8 * i) * kLdS + xi];
#pragma unroll
          for (int j = 0; j < C::kDV / 16; ++j) b[j] = xs[kk * C::kLdX + tx + 16 * j];
#pragma unroll
          for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < C::kDV / 16; ++j) acc2[i][j] += a[i] * b[j];
        }
      }
    }
    __syncthreads();  // S, G, X and the codes are rewritten by the next tile
  }

  // Undo the range scale (exact: powers of two). dk: the last tile's exponent; dq: per row.
  acc_t mul = p.inv_tau;
  if constexpr (kTileScale) mul = ldexpf(p.inv_tau, -tile_scale.exponent);
  if constexpr (kTensorCores) {
    float* stage = reinterpret_cast<float*>(u) + warp * 256;  // u is free after the last sync
    const int lane = tid & 31;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t col0 = d0 + wc * 64 + j * 16;
        if (col0 >= p.d) continue;  // warp-uniform
        wmma::store_matrix_sync(stage, facc[i][j], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int64_t orow = own0 + wr * 32 + i * 16 + (e >> 4), col = col0 + (e & 15);
          if (orow >= own_len || col >= p.d) continue;
          // dq: undo the row's own scale (row_grad of the output row, as in the loop above).
          const acc_t row_mul =
              kForK ? mul
                    : ldexpf(p.inv_tau, -gradient_exponent(row_gradient_bound(row_grad(
                                            p.grad_lse[orow], p.lse[orow], p.grad_pos_mean[orow],
                                            p.pos_count[orow]))));
          write_gradient(p, split, own_len, orow * p.d + col, stage[e] * row_mul);
        }
        __syncwarp();
      }
    }
  } else if constexpr (!kWmma) {
    const int tx = tid & 15, ty = tid >> 4;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t orow = own0 + ty + 8 * i;
      if (orow >= own_len) continue;
#pragma unroll
      for (int j = 0; j < C::kDV / 16; ++j) {
        const int64_t col = d0 + tx + 16 * j;
        if (col < p.d) write_gradient(p, split, own_len, orow * p.d + col, acc2[i][j] * mul);
      }
    }
  }
}

}  // namespace gpu
}  // namespace pair_stats
}  // namespace fastiml
