// clip_lse and siglip_loss on the CPU (DESIGN 11): chunks of row tiles spread over threads, each
// walking every column tile; a tile's products P = Q_r K_c^T come from one float32 (float64 for
// double inputs) matrix product into a reused buffer, half inputs converted a tile at a time.
// Nothing of size N x M is allocated.
//
// clip_lse forward: online log-sum-exps both ways (FlashAttention's running max): each row's
// (max, sum) is owned by its chunk; each chunk keeps its own (max, sum) per column, merged in
// chunk order at the end. Backward: one recompute of each tile, whose G feeds dQ (rows owned by
// the chunk) and dK -- three products per tile. dK is summed over every chunk's rows, so the
// pass walks the columns in blocks of kBlockTiles tiles: per block, each chunk but the first
// adds its share into its own [block, D] buffer, and the buffers are added in chunk order (a
// few MB per thread, whatever M).
// siglip_loss: the same walk, with an O(1) epilogue per pair; its backward recomputes each tile
// once, whose dloss/dlogit feeds the same two products as clip_lse's.
// row_lse: rows only, FlashAttention's forward with the columns as values: each row's running
// (max, sum) and softmax-weighted sum of k, two products per tile; no backward kernel (the
// gradient of q and of the scale is elementwise in that mean). Few row tiles (B = 512 against a
// 65,536-row bank) would leave threads idle, so the columns are split too, into parts merged in
// a fixed order.
// Results are deterministic for a given number of threads.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops/clip_siglip.h"
#include "ops/clip_siglip_host.h"
#include "ops/cpu/capability.h"
#include "ops/pair_stats.h"

namespace FASTIML_NAMESPACE {
namespace clip_siglip {
namespace {

using pair_stats::lse_finish;
using pair_stats::lse_merge;
using pair_stats::lse_raise_max;

constexpr int64_t kTile = 256;
constexpr int64_t kLanes = 16;  // row-sum lanes: one AVX-512 register of float32
constexpr int64_t kBlockTiles = 16;  // column tiles per dK block: 4096 x D per extra thread

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::pair<int64_t, int64_t> chunk_range(int64_t count, int64_t chunks, int64_t chunk) {
  return {count * chunk / chunks, count * (chunk + 1) / chunks};
}

at::Tensor tile_rows(const at::Tensor& x, int64_t start, int64_t len, at::ScalarType acc) {
  at::Tensor t = x.narrow(0, start, len);
  return t.scalar_type() == acc ? t : t.to(acc);
}

// Sum of x[0 .. len) in kLanes fixed lanes: vectorisable without reassociating additions.
template <typename acc_t>
acc_t lane_sum(const acc_t* __restrict x, int64_t len) {
  acc_t sum[kLanes] = {};
  const int64_t whole = len - len % kLanes;
  for (int64_t j0 = 0; j0 < whole; j0 += kLanes)
    for (int64_t lane = 0; lane < kLanes; ++lane) sum[lane] += x[j0 + lane];
  for (int64_t j = whole; j < len; ++j) sum[j - whole] += x[j];
  acc_t total = 0;
  for (int64_t lane = 0; lane < kLanes; ++lane) total += sum[lane];
  return total;
}

// Multiplies x[0 .. len) by t in place and returns the largest product, in kLanes fixed lanes:
// a running `m = v > m ? v : m` over one variable is a scalar loop (GCC does not turn it into a
// vector max without -ffinite-math-only), lanes are independent selects.
template <typename acc_t>
acc_t scale_and_max(acc_t* __restrict x, int64_t len, acc_t t) {
  acc_t lanes[kLanes];
  std::fill(lanes, lanes + kLanes, neg_inf<acc_t>());
  const int64_t whole = len - len % kLanes;
  for (int64_t j0 = 0; j0 < whole; j0 += kLanes)
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      const acc_t v = x[j0 + lane] * t;
      x[j0 + lane] = v;
      lanes[lane] = v > lanes[lane] ? v : lanes[lane];
    }
  for (int64_t j = whole; j < len; ++j) {
    const acc_t v = x[j] * t;
    x[j] = v;
    lanes[j - whole] = v > lanes[j - whole] ? v : lanes[j - whole];
  }
  acc_t m = neg_inf<acc_t>();
  for (int64_t lane = 0; lane < kLanes; ++lane) m = lanes[lane] > m ? lanes[lane] : m;
  return m;
}

struct Problem {
  at::Tensor q, k;
  int64_t n, m, d;
  at::ScalarType acc;
  int64_t row_tiles, col_tiles, chunks;  // chunks: of row tiles, one per thread
};

Problem make_problem(const at::Tensor& q, const at::Tensor& k) {
  // Detached: the tile products are internal, and worker threads do not inherit guards.
  Problem p{q.detach(), k.detach(), q.size(0), k.size(0), q.size(1),
            at::toOpMathType(q.scalar_type()), 0, 0, 0};
  p.row_tiles = ceil_div(p.n, kTile);
  p.col_tiles = ceil_div(p.m, kTile);
  p.chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.row_tiles));
  return p;
}

// Calls tile(c0, bc, kc, P) for each column tile in [c_first, c_last) against the rows qr
// ([br, D], accumulation dtype), P = qr kc^T the raw products in `buffer`.
template <typename Tile>
void walk_columns(const Problem& p, const at::Tensor& qr, int64_t br, at::Tensor& buffer,
                  int64_t c_first, int64_t c_last, Tile tile) {
  for (int64_t c = c_first; c < c_last; ++c) {
    const int64_t c0 = c * kTile, bc = std::min(kTile, p.m - c0);
    const at::Tensor kc = tile_rows(p.k, c0, bc, p.acc);
    at::Tensor P = buffer.narrow(0, 0, br * bc).view({br, bc});
    at::mm_out(P, qr, kc.t());
    tile(c0, bc, kc, P);
  }
}

// Calls tile(r0, br, c0, bc, qr, kc, P) for each tile of chunk `chunk` with a column tile in
// [c_first, c_last), row tile by row tile (row_done(r0, br) after each), P the raw products in
// `buffer`. Every pass makes the same tile products (the backward's exponents rely on it).
template <typename Tile, typename RowDone>
void walk_tiles(const Problem& p, int64_t chunk, at::Tensor& buffer, int64_t c_first,
                int64_t c_last, Tile tile, RowDone row_done) {
  auto [first, last] = chunk_range(p.row_tiles, p.chunks, chunk);
  for (int64_t r = first; r < last; ++r) {
    const int64_t r0 = r * kTile, br = std::min(kTile, p.n - r0);
    const at::Tensor qr = tile_rows(p.q, r0, br, p.acc);
    walk_columns(p, qr, br, buffer, c_first, c_last,
                 [&](int64_t c0, int64_t bc, const at::Tensor& kc, at::Tensor& P) {
                   tile(r0, br, c0, bc, qr, kc, P);
                 });
    row_done(r0, br);
  }
}

template <typename Tile>
void walk_tiles(const Problem& p, int64_t chunk, at::Tensor& buffer, Tile tile) {
  walk_tiles(p, chunk, buffer, 0, p.col_tiles, tile, [](int64_t, int64_t) {});
}

// ------------------------------------------------------------------------------- clip_lse

// Running (max, sum) of a set of log-sum-exps.
template <typename acc_t>
struct LseState {
  std::vector<acc_t> max, sum;
  explicit LseState(int64_t len) : max(len, neg_inf<acc_t>()), sum(len, acc_t(0)) {}
};

// Forward epilogue of the tile at (r0, c0): s (the raw products) becomes S = t s; each row's
// and each column's terms join their running log-sum-exps (the tile's rows at row_max[0, br),
// its columns at col_max[0, bc)); the entries S_ii it holds go to diag[i].
template <typename acc_t>
void lse_tile(acc_t* s, int64_t r0, int64_t br, int64_t c0, int64_t bc, acc_t t,
              acc_t* row_max, acc_t* row_sum, acc_t* __restrict col_max,
              acc_t* __restrict col_sum, acc_t* diag) {
  acc_t e[kTile], tile_max[kTile];
  std::fill(tile_max, tile_max + bc, neg_inf<acc_t>());
  for (int64_t ii = 0; ii < br; ++ii) {
    acc_t* __restrict srow = s + ii * bc;
    const int64_t own = r0 + ii - c0;  // the column of S_ii in the tile, if any
    const acc_t m = scale_and_max(srow, bc, t);
    for (int64_t jj = 0; jj < bc; ++jj)
      tile_max[jj] = srow[jj] > tile_max[jj] ? srow[jj] : tile_max[jj];
    if (own >= 0 && own < bc) diag[r0 + ii] = srow[own];
    lse_raise_max(row_max[ii], row_sum[ii], m);
    const acc_t shift = row_max[ii];
    for (int64_t jj = 0; jj < bc; ++jj) e[jj] = exp_acc(srow[jj] - shift);
    row_sum[ii] += lane_sum(e, bc);
  }
  for (int64_t jj = 0; jj < bc; ++jj) lse_raise_max(col_max[jj], col_sum[jj], tile_max[jj]);
  for (int64_t ii = 0; ii < br; ++ii) {
    const acc_t* __restrict srow = s + ii * bc;
    for (int64_t jj = 0; jj < bc; ++jj) col_sum[jj] += exp_acc(srow[jj] - col_max[jj]);
  }
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_forward(const Problem& p, acc_t t) {
  const auto options = p.q.options().dtype(p.acc);
  at::Tensor row_lse = at::empty({p.n}, options), col_lse = at::empty({p.m}, options);
  at::Tensor diag = at::empty({std::min(p.n, p.m)}, options);
  acc_t* row_out = row_lse.data_ptr<acc_t>();
  acc_t* diag_out = diag.data_ptr<acc_t>();
  std::vector<LseState<acc_t>> cols(p.chunks, LseState<acc_t>(0));
  at::parallel_for(0, p.chunks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({kTile * kTile}, options);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      LseState<acc_t> col(p.m), row(kTile);
      walk_tiles(
          p, chunk, buffer, 0, p.col_tiles,
          [&](int64_t r0, int64_t br, int64_t c0, int64_t bc, const at::Tensor&,
              const at::Tensor&, at::Tensor& P) {
            lse_tile<acc_t>(P.data_ptr<acc_t>(), r0, br, c0, bc, t, row.max.data(),
                            row.sum.data(), col.max.data() + c0, col.sum.data() + c0, diag_out);
          },
          [&](int64_t r0, int64_t br) {
            for (int64_t ii = 0; ii < br; ++ii) {
              row_out[r0 + ii] = lse_finish(row.max[ii], row.sum[ii]);
              row.max[ii] = neg_inf<acc_t>();
              row.sum[ii] = 0;
            }
          });
      cols[chunk] = std::move(col);
    }
  });
  acc_t* col_out = col_lse.data_ptr<acc_t>();
  at::parallel_for(0, p.m, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      acc_t m = neg_inf<acc_t>(), l = 0;
      for (const auto& c : cols) lse_merge(m, l, c.max[j], c.sum[j]);
      col_out[j] = lse_finish(m, l);
    }
  });
  return {row_lse, col_lse, diag};
}

// G of the tile at (r0, c0) over the raw products s: g_r[i] e^(t s_ij - r_i) +
// g_c[j] e^(t s_ij - c_j) + g_d[i] [i == j] (each exponent <= 0: the forward's lse of the same
// tile products bounds it). The pointers are at the tile's first row / column.
template <typename acc_t>
void clip_gradient_tile(acc_t* s, int64_t r0, int64_t br, int64_t c0, int64_t bc, acc_t t,
                        const acc_t* row_grad, const acc_t* row_lse, const acc_t* diag_grad,
                        const acc_t* __restrict col_grad, const acc_t* __restrict col_lse) {
  for (int64_t ii = 0; ii < br; ++ii) {
    acc_t* __restrict srow = s + ii * bc;
    const acc_t a = row_grad[ii], r = row_lse[ii];
    const int64_t own = r0 + ii - c0;  // the column of S_ii in the tile, if any
    for (int64_t jj = 0; jj < bc; ++jj) {
      const acc_t v = srow[jj] * t;
      srow[jj] = a * exp_acc(v - r) + col_grad[jj] * exp_acc(v - col_lse[jj]);
    }
    if (own >= 0 && own < bc) srow[own] += diag_grad[ii];
  }
}

// The backward of a tiled pass whose tile epilogue `grad_tile(s, r0, br, c0, bc)` turns the raw
// products into G = dloss/dlogit: G K into grad_q (rows owned by the chunk), G^T Q into grad_k,
// by blocks of columns (see the top of the file); the caller multiplies them by the scale. Each
// is computed when its output is defined on entry (zeros [N, D] / [M, D]).
template <typename acc_t, typename GradTile>
void gradient_pass(const Problem& p, at::Tensor& grad_q, at::Tensor& grad_k,
                   GradTile grad_tile) {
  const auto options = p.q.options().dtype(p.acc);
  const bool want_q = grad_q.defined(), want_k = grad_k.defined();
  // Chunk 0 adds its share of a block into grad_k itself, the others into their buffers.
  std::vector<at::Tensor> partial(p.chunks);
  if (want_k)
    for (int64_t c = 1; c < p.chunks; ++c)
      partial[c] = at::empty({std::min(p.m, kBlockTiles * kTile), p.d}, options);
  for (int64_t c_first = 0; c_first < p.col_tiles; c_first += kBlockTiles) {
    const int64_t c_last = std::min(p.col_tiles, c_first + kBlockTiles);
    const int64_t k0 = c_first * kTile, k_len = std::min(p.m, c_last * kTile) - k0;
    at::parallel_for(0, p.chunks, 1, [&](int64_t begin, int64_t end) {
      at::Tensor buffer = at::empty({kTile * kTile}, options);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        at::Tensor acc;
        if (want_k)
          acc = chunk == 0 ? grad_k.narrow(0, k0, k_len)
                           : partial[chunk].narrow(0, 0, k_len).zero_();
        walk_tiles(
            p, chunk, buffer, c_first, c_last,
            [&](int64_t r0, int64_t br, int64_t c0, int64_t bc, const at::Tensor& qr,
                const at::Tensor& kc, at::Tensor& G) {
              grad_tile(G.data_ptr<acc_t>(), r0, br, c0, bc);
              if (want_q) grad_q.narrow(0, r0, br).addmm_(G, kc);
              if (want_k) acc.narrow(0, c0 - k0, bc).addmm_(G.t(), qr);
            },
            [](int64_t, int64_t) {});
      }
    });
    if (want_k)
      for (int64_t c = 1; c < p.chunks; ++c)
        grad_k.narrow(0, k0, k_len).add_(partial[c].narrow(0, 0, k_len));
  }
}

// Multiplies the defined gradients by the scale t.
void scale_grads(at::Tensor& grad_q, at::Tensor& grad_k, double t) {
  if (grad_q.defined()) grad_q.mul_(t);
  if (grad_k.defined()) grad_k.mul_(t);
}

template <typename acc_t>
at::Tensor clip_backward(const Problem& p, acc_t t, const at::Tensor& grad_row,
                         const at::Tensor& grad_col, const at::Tensor& grad_diag,
                         const at::Tensor& row_lse, const at::Tensor& col_lse, bool q_needs,
                         bool k_needs, bool t_needs, at::Tensor& grad_q, at::Tensor& grad_k) {
  const auto options = p.q.options().dtype(p.acc);
  const at::Tensor gr = grad_row.contiguous(), gc = grad_col.contiguous();
  // g_d as [N] (zero past min(N, M)): indexed by row like g_r.
  const at::Tensor gd = at::zeros({p.n}, options);
  gd.narrow(0, 0, grad_diag.size(0)).copy_(grad_diag);
  const at::Tensor rl = row_lse.contiguous(), cl = col_lse.contiguous();
  const acc_t *gr_p = gr.data_ptr<acc_t>(), *gc_p = gc.data_ptr<acc_t>();
  const acc_t *gd_p = gd.data_ptr<acc_t>();
  const acc_t *rl_p = rl.data_ptr<acc_t>(), *cl_p = cl.data_ptr<acc_t>();
  if (q_needs || t_needs) grad_q = at::zeros({p.n, p.d}, options);
  if (k_needs) grad_k = at::zeros({p.m, p.d}, options);
  gradient_pass<acc_t>(p, grad_q, grad_k,
                       [&](acc_t* s, int64_t r0, int64_t br, int64_t c0, int64_t bc) {
                         clip_gradient_tile<acc_t>(s, r0, br, c0, bc, t, gr_p + r0, rl_p + r0,
                                                   gd_p + r0, gc_p + c0, cl_p + c0);
                       });
  // dt = sum_ij G_ij P_ij = sum_i <q_i, (G K)_i>: from dQ's rows before their scaling, one
  // partial per row tile, added in order.
  std::vector<double> dt(p.row_tiles, 0.0);
  if (t_needs)
    at::parallel_for(0, p.row_tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t r0 = r * kTile, br = std::min(kTile, p.n - r0);
        dt[r] = at::sum(tile_rows(p.q, r0, br, p.acc) * grad_q.narrow(0, r0, br), at::kDouble)
                    .item<double>();
      }
    });
  double total = 0;
  for (double v : dt) total += v;
  if (!q_needs) grad_q = at::Tensor();
  scale_grads(grad_q, grad_k, double(t));
  return at::scalar_tensor(total, options);
}

// ---------------------------------------------------------------------------- siglip_loss

// Per-row-tile partial sums of siglip_loss: the loss, or its gradients wrt t and b.
struct SiglipSums {
  double loss = 0, grad_scale = 0, grad_bias = 0;
};

// One tile of siglip_loss over the raw products s (rows r0.., columns c0..). Forward
// (grad_weight == 0): adds the tile's loss to `sums`. Backward: overwrites s with
// G = grad_weight * dloss/dlogit and adds sum G P and sum G to `sums`.
template <typename acc_t>
void siglip_tile(acc_t* s, int64_t r0, int64_t br, int64_t c0, int64_t bc, acc_t t, acc_t b,
                 int64_t offset, acc_t grad_weight, SiglipSums& sums) {
  acc_t terms[kTile];
  for (int64_t ii = 0; ii < br; ++ii) {
    acc_t* __restrict srow = s + ii * bc;
    const int64_t positive = r0 + ii + offset - c0;  // the positive's column in the tile, if any
    if (grad_weight == acc_t(0)) {
      for (int64_t jj = 0; jj < bc; ++jj)
        terms[jj] = sigmoid_pair(t * srow[jj] + b, jj == positive).loss;
      sums.loss += lane_sum(terms, bc);
      continue;
    }
    for (int64_t jj = 0; jj < bc; ++jj) {
      const acc_t raw = srow[jj];
      const acc_t g = grad_weight * sigmoid_pair(t * raw + b, jj == positive).grad;
      terms[jj] = g * raw;
      srow[jj] = g;
    }
    sums.grad_scale += lane_sum(terms, bc);
    sums.grad_bias += lane_sum(srow, bc);
  }
}

// Every tile's epilogue, without products beyond P (the loss; the scalars' gradients alone).
template <typename acc_t, typename Epilogue>
void epilogue_pass(const Problem& p, Epilogue epilogue) {
  at::parallel_for(0, p.chunks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({kTile * kTile}, p.q.options().dtype(p.acc));
    for (int64_t chunk = begin; chunk < end; ++chunk)
      walk_tiles(p, chunk, buffer,
                 [&](int64_t r0, int64_t br, int64_t c0, int64_t bc, const at::Tensor&,
                     const at::Tensor&, at::Tensor& P) {
                   epilogue(P.data_ptr<acc_t>(), r0, br, c0, bc);
                 });
  });
}

SiglipSums add_up(const std::vector<SiglipSums>& sums) {
  SiglipSums total;
  for (const auto& s : sums) {  // row tile by row tile: a fixed order
    total.loss += s.loss;
    total.grad_scale += s.grad_scale;
    total.grad_bias += s.grad_bias;
  }
  return total;
}

template <typename acc_t>
at::Tensor siglip_forward(const Problem& p, acc_t t, acc_t b, int64_t offset) {
  std::vector<SiglipSums> sums(p.row_tiles);
  epilogue_pass<acc_t>(p, [&](acc_t* s, int64_t r0, int64_t br, int64_t c0, int64_t bc) {
    siglip_tile<acc_t>(s, r0, br, c0, bc, t, b, offset, acc_t(0), sums[r0 / kTile]);
  });
  return at::scalar_tensor(add_up(sums).loss, p.q.options().dtype(p.acc));
}

// The gradients of grad_loss * loss: (dq, dk, dt, db), undefined where not needed.
template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_backward(
    const Problem& p, acc_t t, acc_t b, int64_t offset, acc_t grad_loss, bool q_needs,
    bool k_needs, bool scalars_need) {
  const auto options = p.q.options().dtype(p.acc);
  std::vector<SiglipSums> sums(p.row_tiles);
  const auto epilogue = [&](acc_t* s, int64_t r0, int64_t br, int64_t c0, int64_t bc) {
    siglip_tile<acc_t>(s, r0, br, c0, bc, t, b, offset, grad_loss, sums[r0 / kTile]);
  };
  at::Tensor grad_q, grad_k, grad_t, grad_b;
  if (q_needs) grad_q = at::zeros({p.n, p.d}, options);
  if (k_needs) grad_k = at::zeros({p.m, p.d}, options);
  // A zero incoming gradient (which the epilogue reads as "forward") gives zeros.
  if (grad_loss != acc_t(0)) {
    if (q_needs || k_needs) {
      gradient_pass<acc_t>(p, grad_q, grad_k, epilogue);
      scale_grads(grad_q, grad_k, double(t));
    } else if (scalars_need) {
      epilogue_pass<acc_t>(p, epilogue);
    }
  }
  if (scalars_need) {
    const SiglipSums total = add_up(sums);
    grad_t = at::scalar_tensor(total.grad_scale, options);
    grad_b = at::scalar_tensor(total.grad_bias, options);
  }
  return {grad_q, grad_k, grad_t, grad_b};
}


// -------------------------------------------------------------------------------- row_lse

// The running state of the rows of one row tile over one part of the columns: (max, sum) per
// row and, with the mean, W = sum_j e^(S_ij - max_i) k_j ([br, D], accumulation dtype).
template <typename acc_t>
struct RowState {
  std::vector<acc_t> max, sum;
  at::Tensor weighted;  // undefined without the mean
};

// Forward epilogue of one tile for row_lse: s (the raw products, [br, bc]) becomes
// E_ij = e^(t s_ij - max_i) after each row's max is raised to cover the tile (its sum and its
// row of W rescaled by e^(old max - new max), FlashAttention's rule); E's rows join the sums.
template <typename acc_t>
void row_lse_tile(acc_t* s, int64_t br, int64_t bc, acc_t t, int64_t d, RowState<acc_t>& st) {
  acc_t* w = st.weighted.defined() ? st.weighted.template data_ptr<acc_t>() : nullptr;
  for (int64_t ii = 0; ii < br; ++ii) {
    acc_t* __restrict srow = s + ii * bc;
    const acc_t m = scale_and_max(srow, bc, t);
    const acc_t old_max = st.max[ii];
    if (m > old_max) {
      const acc_t rescale = old_max == neg_inf<acc_t>() ? acc_t(0) : exp_acc(old_max - m);
      st.sum[ii] *= rescale;
      if (w != nullptr)
        for (int64_t x = 0; x < d; ++x) w[ii * d + x] *= rescale;
      st.max[ii] = m;
    }
    const acc_t shift = st.max[ii];  // a local: a reference could alias srow, unvectorised
    for (int64_t jj = 0; jj < bc; ++jj) srow[jj] = exp_acc(srow[jj] - shift);
    st.sum[ii] += lane_sum(srow, bc);
  }
}

// Merges the state `b` of a later column part into `a` (same rows).
template <typename acc_t>
void merge_row_states(RowState<acc_t>& a, const RowState<acc_t>& b, int64_t d) {
  acc_t* wa = a.weighted.defined() ? a.weighted.template data_ptr<acc_t>() : nullptr;
  const acc_t* wb = b.weighted.defined() ? b.weighted.template data_ptr<acc_t>() : nullptr;
  for (size_t ii = 0; ii < a.max.size(); ++ii) {
    if (b.sum[ii] == acc_t(0)) continue;
    const acc_t mx = a.max[ii] > b.max[ii] ? a.max[ii] : b.max[ii];
    const acc_t fa = a.sum[ii] == acc_t(0) ? acc_t(0) : exp_acc(a.max[ii] - mx);
    const acc_t fb = exp_acc(b.max[ii] - mx);
    a.sum[ii] = a.sum[ii] * fa + b.sum[ii] * fb;
    a.max[ii] = mx;
    if (wa != nullptr)
      for (int64_t x = 0; x < d; ++x) wa[ii * d + x] = wa[ii * d + x] * fa + wb[ii * d + x] * fb;
  }
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor> row_lse_forward(const Problem& p, acc_t t, bool with_mean) {
  const auto options = p.q.options().dtype(p.acc);
  at::Tensor lse = at::empty({p.n}, options);
  at::Tensor mean = with_mean ? at::empty({p.n, p.d}, options) : at::empty({0}, options);
  // Work items: (row tile, column part); enough parts that every thread has one.
  const int64_t threads = at::get_num_threads();
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>(p.col_tiles, ceil_div(threads, std::max<int64_t>(p.row_tiles, 1))));
  std::vector<RowState<acc_t>> states(p.row_tiles * parts);
  at::parallel_for(0, p.row_tiles * parts, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({kTile * kTile}, options);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / parts, r0 = r * kTile, br = std::min(kTile, p.n - r0);
      const auto [c_first, c_last] = chunk_range(p.col_tiles, parts, item % parts);
      RowState<acc_t>& st = states[item];
      st.max.assign(br, neg_inf<acc_t>());
      st.sum.assign(br, acc_t(0));
      if (with_mean) st.weighted = at::zeros({br, p.d}, options);
      walk_columns(p, tile_rows(p.q, r0, br, p.acc), br, buffer, c_first, c_last,
                   [&](int64_t, int64_t bc, const at::Tensor& kc, at::Tensor& P) {
                     row_lse_tile<acc_t>(P.data_ptr<acc_t>(), br, bc, t, p.d, st);
                     if (with_mean) st.weighted.addmm_(P, kc);
                   });
    }
  });
  acc_t* lse_out = lse.data_ptr<acc_t>();
  at::parallel_for(0, p.row_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      RowState<acc_t>& st = states[r * parts];
      for (int64_t part = 1; part < parts; ++part)
        merge_row_states(st, states[r * parts + part], p.d);
      const int64_t r0 = r * kTile, br = static_cast<int64_t>(st.max.size());
      for (int64_t ii = 0; ii < br; ++ii) lse_out[r0 + ii] = lse_finish(st.max[ii], st.sum[ii]);
      if (!with_mean) continue;
      // W / sum; a row without columns (M = 0) has the zero mean.
      std::vector<acc_t> inverse(br);
      for (int64_t ii = 0; ii < br; ++ii)
        inverse[ii] = st.sum[ii] > acc_t(0) ? acc_t(1) / st.sum[ii] : acc_t(0);
      const acc_t* w = st.weighted.template data_ptr<acc_t>();
      acc_t* out = mean.template data_ptr<acc_t>() + r0 * p.d;
      for (int64_t ii = 0; ii < br; ++ii)
        for (int64_t x = 0; x < p.d; ++x) out[ii * p.d + x] = w[ii * p.d + x] * inverse[ii];
    }
  });
  return {lse, mean};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_lse_cpu(const at::Tensor& q,
                                                            const at::Tensor& k,
                                                            const at::Tensor& scale) {
  check_features(q, k, "clip_lse");
  check_scalar(scale, "scale", q, "clip_lse");
  const Problem p = make_problem(q, k);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "clip_lse_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    out = clip_forward<acc_t>(p, scale.item<acc_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_lse_backward_cpu(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& grad_diag,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale, const at::Tensor& row_lse,
    const at::Tensor& col_lse, bool q_needs_grad, bool k_needs_grad, bool scale_needs_grad) {
  check_backward_inputs(grad_row, grad_col, grad_diag, q, k, scale, row_lse, col_lse);
  const Problem p = make_problem(q, k);
  at::Tensor grad_q, grad_k, grad_scale;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "clip_lse_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        grad_scale = clip_backward<acc_t>(p, scale.item<acc_t>(), grad_row, grad_col, grad_diag,
                                          row_lse, col_lse, q_needs_grad, k_needs_grad,
                                          scale_needs_grad, grad_q, grad_k);
      });
  return {grad_or_empty(grad_q, q), grad_or_empty(grad_k, k),
          scale_needs_grad ? grad_scale : at::empty({0}, scale.options())};
}

at::Tensor siglip_loss_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                           const at::Tensor& bias, int64_t offset) {
  check_siglip_inputs(q, k, scale, bias, offset, "siglip_loss");
  const Problem p = make_problem(q, k);
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "siglip_loss_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        loss = siglip_forward<acc_t>(p, scale.item<acc_t>(), bias.item<acc_t>(), offset);
      });
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
    const at::Tensor& bias, int64_t offset, bool q_needs_grad, bool k_needs_grad,
    bool scalars_need_grad) {
  check_siglip_inputs(q, k, scale, bias, offset, "siglip_loss_backward");
  check_scalar(grad, "grad", q, "siglip_loss_backward");
  const Problem p = make_problem(q, k);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "siglip_loss_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        out = siglip_backward<acc_t>(p, scale.item<acc_t>(), bias.item<acc_t>(), offset,
                                     grad.item<acc_t>(), q_needs_grad, k_needs_grad,
                                     scalars_need_grad);
      });
  const auto& [grad_q, grad_k, grad_scale, grad_bias] = out;
  return {grad_or_empty(grad_q, q), grad_or_empty(grad_k, k), grad_or_empty(grad_scale, scale),
          grad_or_empty(grad_bias, bias)};
}

std::tuple<at::Tensor, at::Tensor> row_lse_cpu(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& scale, bool with_mean) {
  check_features(q, k, "row_lse");
  check_scalar(scale, "scale", q, "row_lse");
  const Problem p = make_problem(q, k);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "row_lse_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    out = row_lse_forward<acc_t>(p, scale.item<acc_t>(), with_mean);
  });
  return out;
}

}  // namespace clip_siglip
}  // namespace fastiml

// Registered once, by the base build; each op runs the kernel of the CPU level in force.
#if !defined(FASTIML_CPU_CAPABILITY)
FASTIML_CPU_DECLARE_LEVELS(clip_siglip, clip_lse_cpu)
FASTIML_CPU_DECLARE_LEVELS(clip_siglip, clip_lse_backward_cpu)
FASTIML_CPU_DECLARE_LEVELS(clip_siglip, siglip_loss_cpu)
FASTIML_CPU_DECLARE_LEVELS(clip_siglip, siglip_loss_backward_cpu)
FASTIML_CPU_DECLARE_LEVELS(clip_siglip, row_lse_cpu)

TORCH_LIBRARY_IMPL(fastiml, CPU, m) {
  m.impl("clip_lse", FASTIML_CPU_DISPATCH(clip_siglip, clip_lse_cpu));
  m.impl("clip_lse_backward", FASTIML_CPU_DISPATCH(clip_siglip, clip_lse_backward_cpu));
  m.impl("siglip_loss", FASTIML_CPU_DISPATCH(clip_siglip, siglip_loss_cpu));
  m.impl("siglip_loss_backward", FASTIML_CPU_DISPATCH(clip_siglip, siglip_loss_backward_cpu));
  m.impl("row_lse", FASTIML_CPU_DISPATCH(clip_siglip, row_lse_cpu));
}
#endif
