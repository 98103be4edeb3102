// One DGC layer's eval-mode forward on CPU, in one call per layer and batch.
//
// dgc_convert::dgc_conv2d computes, for every sample b and head h (see
// docs/method.md, section 1):
//   1. the saliency scores (mean over H*W, two small FCs, relus, beta) or
//      all ones (unit_scores);
//   2. the `kept` channels with the largest scores, ties to the lower channel
//      index (the layer's rule), or, given a threshold (network gating), every
//      channel scoring above it and at least the top one; kept channels with
//      score 0 skipped (they add 0);
//   3. a per-(sample, head) weight: the kept rows of the prepacked weight,
//      scaled by their scores, laid out [column block][tap][kept][block width]
//      so the micro-kernel reads it as one contiguous stream;
//   4. a direct convolution over the kept channels: register tiles of MR output
//      pixels x NV vectors of output channels; input values are broadcast
//      straight from the channels-last input (x[b, iy, ix, idx[c]], a zero row
//      standing in for padding), so no gathered copy of the input is made;
//   5. the bias, and the store into a channels-last output in head-major
//      (blocked) order: head h owns channels h*n + j. A layer of the older
//      interleaved layout relabels the channels itself, in Python.
//
// dgc_convert::dgc_pack_weight turns the dense weight (C', C, kh, kw) into the
// prepacked form (H, C, kh, kw, n) once, n = C'/H, row (h, c) holding head h's
// filters over input channel c, contiguous over taps and output channels.
//
// Vector code is written with GCC vector extensions: -march=native gives
// AVX-512 (16 lanes, 32 registers) or AVX2 (8 lanes, 16 registers); anything
// else gets 4-lane vectors.

#include <ATen/Parallel.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

namespace dgc {
namespace {

#if defined(__AVX512F__)
constexpr int VW = 16;     // lanes per vector
constexpr int NVMAX = 4;   // vectors of output channels per register tile
constexpr int MR_TABLE[NVMAX] = {10, 10, 8, 6};  // output pixels per tile, by NV
#elif defined(__AVX2__) || defined(__AVX__)
constexpr int VW = 8;
constexpr int NVMAX = 3;
constexpr int MR_TABLE[NVMAX] = {8, 6, 4};
#else
constexpr int VW = 4;
constexpr int NVMAX = 3;
constexpr int MR_TABLE[NVMAX] = {8, 6, 4};
#endif
constexpr int MRMAX = 12;
constexpr int64_t ALIGN = 64;

typedef float vf __attribute__((vector_size(VW * sizeof(float)), may_alias));
typedef float vfu __attribute__((vector_size(VW * sizeof(float)), may_alias, aligned(4)));

inline vf load_a(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline vf load_u(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store_u(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
// A broadcast (vbroadcastss from memory where it can): `vf{} + s` would add +0.0 first.
inline vf splat(float s) {
#if defined(__AVX512F__)
  return _mm512_set1_ps(s);
#elif defined(__AVX__)
  return _mm256_set1_ps(s);
#else
  vf v;
  for (int i = 0; i < VW; ++i) v[i] = s;
  return v;
#endif
}
inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(v);
#elif defined(__AVX__)
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
#else
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
#endif
}

// out[r] = dot(rows[r * len .. ], v) for `count` consecutive rows. Long rows
// one at a time with eight partial sums (one sequential stream: at batch 1 the
// saliency weights are read once per call, so this is a memory stream); short
// rows eight at a time, so the FMA chains run side by side.
void row_dots(const float* rows, int64_t count, int64_t len, const float* v, float* out) {
  constexpr int R = 8;
  int64_t r = 0;
  if (len >= R * VW) {
    for (; r < count; ++r) {
      const float* row = rows + r * len;
      vf acc[R];
      for (int i = 0; i < R; ++i) acc[i] = vf{};
      int64_t c = 0;
      for (; c + R * VW <= len; c += R * VW) {
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) acc[i] += load_u(row + c + i * VW) * load_u(v + c + i * VW);
      }
      for (; c + VW <= len; c += VW) acc[0] += load_u(row + c) * load_u(v + c);
      vf sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      float s = hsum(sum);
      for (; c < len; ++c) s += row[c] * v[c];
      out[r] = s;
    }
    return;
  }
  if (len >= VW) {
    for (; r + R <= count; r += R) {
      vf acc[R];
      for (int i = 0; i < R; ++i) acc[i] = vf{};
      int64_t c = 0;
      for (; c + VW <= len; c += VW) {
        const vf x = load_u(v + c);
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) acc[i] += load_u(rows + (r + i) * len + c) * x;
      }
      for (int i = 0; i < R; ++i) {
        float s = hsum(acc[i]);
        for (int64_t t = c; t < len; ++t) s += rows[(r + i) * len + t] * v[t];
        out[r + i] = s;
      }
    }
  }
  for (; r < count; ++r) {
    const float* row = rows + r * len;
    vf acc = vf{};
    int64_t c = 0;
    for (; c + VW <= len; c += VW) acc += load_u(row + c) * load_u(v + c);
    float s = hsum(acc);
    for (; c < len; ++c) s += row[c] * v[c];
    out[r] = s;
  }
}

// A growable 64-byte aligned buffer, one per thread (workers keep theirs
// between calls, so steady-state calls allocate nothing but the output).
struct Buffer {
  void* data = nullptr;
  size_t bytes = 0;
  ~Buffer() { std::free(data); }
  template <typename T>
  T* get(size_t count) {
    size_t need = ((count * sizeof(T) + ALIGN - 1) / ALIGN) * ALIGN;
    if (need > bytes) {
      std::free(data);
      data = std::aligned_alloc(ALIGN, need);
      TORCH_CHECK(data != nullptr, "dgc_conv2d: out of memory for ", need, " bytes of scratch");
      bytes = need;
    }
    return static_cast<T*>(data);
  }
};

// Per-thread scratch.
struct HeadScratch {
  Buffer scores, squeezed, kept_scores, ptrs, weight, idx, bias, ks, pooled, keys;
};

HeadScratch& thread_scratch() {
  static thread_local HeadScratch s;
  return s;
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---------------------------------------------------------------------------
// Micro-kernel: MR output pixels x NV vectors of output channels, accumulated
// over taps x kept channels. ptrs[m * taps + t] points at the channels-last row
// that output pixel m reads at tap t (or at a zero row); idx are the kept channels;
// w is [tap][kept][NV * VW], scores folded in.
// Store the first `lanes` (< VW) lanes of v.
inline void store_partial(float* p, vf v, int lanes) {
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << lanes) - 1u), v);
#else
  for (int i = 0; i < lanes; ++i) p[i] = v[i];
#endif
}

// Micro-kernel: MR output pixels x NV vectors of output channels, accumulated
// over taps x kept channels, then bias added and stored: out + m * ostride
// gets pixel m's `valid` outputs. ptrs[m * taps + t] points at the
// channels-last row that output pixel m reads at tap t (or a zero row); idx are
// the kept channels; w is [tap][kept][NV * VW], scores folded in.
template <int MR, int NV>
__attribute__((noinline)) void tile_kernel(const float* const* ptrs, int taps, const int32_t* idx, int k,
                                           const float* w, float* out, int64_t ostride, const float* bias,
                                           int valid) {
  vf acc[MR][NV];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = vf{};
  for (int t = 0; t < taps; ++t) {
    const float* p[MR];
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) p[m] = ptrs[m * taps + t];
    const float* wt = w + static_cast<int64_t>(t) * k * NV * VW;
    for (int c = 0; c < k; ++c) {
      const int32_t off = idx[c];
      vf wv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) wv[v] = load_a(wt + (c * NV + v) * VW);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const vf b = splat(p[m][off]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] += b * wv[v];
      }
    }
  }
  vf bv[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) bv[v] = load_a(bias + v * VW);
  if (valid == NV * VW) {
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) store_u(out + m * ostride + v * VW, acc[m][v] + bv[v]);
  } else {
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) {
        const int lanes = valid - v * VW;
        if (lanes >= VW)
          store_u(out + m * ostride + v * VW, acc[m][v] + bv[v]);
        else if (lanes > 0)
          store_partial(out + m * ostride + v * VW, acc[m][v] + bv[v], lanes);
      }
  }
}

using KernelFn = void (*)(const float* const*, int, const int32_t*, int, const float*, float*, int64_t, const float*,
                          int);

template <int NV, int... MRs>
constexpr std::array<KernelFn, sizeof...(MRs)> make_row(std::integer_sequence<int, MRs...>) {
  return {&tile_kernel<MRs + 1, NV>...};
}

struct KernelTable {
  KernelFn fn[NVMAX][MRMAX];
  KernelTable() {
    for (auto& row : fn)
      for (auto& f : row) f = nullptr;
    fill<1>();
  }
  template <int NV>
  void fill() {
    if constexpr (NV <= NVMAX) {
      constexpr int mr = MR_TABLE[NV - 1];
      auto row = make_row<NV>(std::make_integer_sequence<int, mr>{});
      for (int m = 0; m < mr; ++m) fn[NV - 1][m] = row[m];
      fill<NV + 1>();
    }
  }
};

const KernelTable& kernels() {
  static const KernelTable table;
  return table;
}

// ---------------------------------------------------------------------------
// Geometry and per-call constants shared by every task.
struct Problem {
  int64_t batch, channels, height, width;  // input
  int64_t heads, per_head, out_channels;   // n = per_head
  int64_t kh, kw, taps;
  int64_t sy, sx, py, px, dy, dx;
  int64_t out_h, out_w, pixels;
  int64_t kept;
  int64_t hidden;
  bool unit_scores;
  bool use_threshold;  // network gating: keep scores > threshold (at least the top one), not the top `kept`
  float threshold;
  const float* x;        // (B, H, W, C) channels-last
  const float* packed;   // (heads, C, kh, kw, n)
  const float* bias;     // (C') or null
  const float* reduce;   // (heads, hidden, C)
  const float* expand;   // (heads, C, hidden)
  const float* beta;     // (heads, C)
  const float* pooled;   // (B, C) means
  const float* scores;   // (B, heads, C) saliency computed for the whole batch, or null
  const float* zero_row; // C zeros
  float* out;            // (B, Ho, Wo, C') channels-last
  // Column blocks of a head's n outputs: nb blocks, block i has nv[i] vectors.
  int nb;
  int nv[64];
  int64_t col0[64];       // first output (within the head) of block i
  int64_t wblock0[64];    // offset (in units of taps * k_eff) of block i in the packed weight
  int64_t width_pad;      // sum of block widths = n rounded up to VW
};

// Saliency of one (sample, head): scores[c] >= 0.
void head_scores(const Problem& pr, const float* pooled, int64_t h, float* scores, float* squeezed) {
  const int64_t C = pr.channels, hid = pr.hidden;
  row_dots(pr.reduce + h * hid * C, hid, C, pooled, squeezed);
  for (int64_t j = 0; j < hid; ++j) squeezed[j] = squeezed[j] > 0.f ? squeezed[j] : 0.f;
  row_dots(pr.expand + h * C * hid, C, hid, squeezed, scores);
  const float* beta = pr.beta + h * C;
  for (int64_t c = 0; c < C; ++c) {
    const float s = scores[c] + beta[c];
    scores[c] = s > 0.f ? s : (std::isnan(s) ? s : 0.f);
  }
}

inline float dot(const float* a, const float* b, int64_t len) {
  vf acc0 = vf{}, acc1 = vf{}, acc2 = vf{}, acc3 = vf{};
  int64_t c = 0;
  for (; c + 4 * VW <= len; c += 4 * VW) {
    acc0 += load_u(a + c) * load_u(b + c);
    acc1 += load_u(a + c + VW) * load_u(b + c + VW);
    acc2 += load_u(a + c + 2 * VW) * load_u(b + c + 2 * VW);
    acc3 += load_u(a + c + 3 * VW) * load_u(b + c + 3 * VW);
  }
  for (; c + VW <= len; c += VW) acc0 += load_u(a + c) * load_u(b + c);
  float s = hsum((acc0 + acc1) + (acc2 + acc3));
  for (; c < len; ++c) s += a[c] * b[c];
  return s;
}

// Head h's scores for every sample of the batch, each weight row read once
// (past batch 1 the saliency weights, not the products, are what costs).
void batch_scores(const Problem& pr, int64_t h, float* squeezed, float* out) {
  const int64_t C = pr.channels, hid = pr.hidden, B = pr.batch, H = pr.heads;
  const float* red = pr.reduce + h * hid * C;
  for (int64_t j = 0; j < hid; ++j)
    for (int64_t b = 0; b < B; ++b) {
      const float s = dot(red + j * C, pr.pooled + b * C, C);
      squeezed[b * hid + j] = s > 0.f ? s : 0.f;
    }
  const float* ex = pr.expand + h * C * hid;
  const float* beta = pr.beta + h * C;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t b = 0; b < B; ++b) {
      const float s = dot(ex + c * hid, squeezed + b * hid, hid) + beta[c];
      out[(b * H + h) * C + c] = s > 0.f ? s : (std::isnan(s) ? s : 0.f);
    }
}

inline float scores_at(const Problem& pr, const float* scores, int64_t c) { return pr.unit_scores ? 1.f : scores[c]; }

// Network gating: every channel scoring above the threshold, or, when none
// does, the top one (the first of equal scores); sorted by channel, zero
// scores dropped. Returns k_eff.
int64_t select_above(const Problem& pr, const float* scores, int32_t* idx, float* kept_scores) {
  const int64_t C = pr.channels;
  const float t = pr.threshold;
  int64_t n = 0, best = 0;
  for (int64_t c = 0; c < C; ++c) {
    const float s = pr.unit_scores ? 1.f : scores[c];
    if (s > scores_at(pr, scores, best)) best = c;
    if (s > t && s != 0.f) {
      idx[n] = static_cast<int32_t>(c);
      kept_scores[n] = s;
      ++n;
    }
  }
  const float top = scores_at(pr, scores, best);
  if (n == 0 && top != 0.f) {  // none above t: the top one
    idx[0] = static_cast<int32_t>(best);
    kept_scores[0] = top;
    n = 1;
  }
  return n;
}

// Kept channels of one (sample, head): the `kept` largest scores, ties to the
// lower channel, sorted by channel, zero scores dropped. Returns k_eff.
int64_t select_channels(const Problem& pr, const float* scores, int32_t* idx, float* kept_scores) {
  if (pr.use_threshold) return select_above(pr, scores, idx, kept_scores);
  const int64_t C = pr.channels, k = pr.kept;
  if (pr.unit_scores) {
    for (int64_t i = 0; i < k; ++i) {
      idx[i] = static_cast<int32_t>(i);
      kept_scores[i] = 1.f;
    }
    return k;
  }
  if (k < C) {
    // One integer key per channel: the score's bits (scores are >= 0, so
    // their bits order like the floats; NaN ranks above everything, as in
    // torch.topk), then the complement of the channel, so equal scores rank
    // the lower channel first. Larger key = kept first.
    HeadScratch& s = thread_scratch();
    uint64_t* keys = s.keys.get<uint64_t>(C);
    for (int64_t c = 0; c < C; ++c) {
      float v = scores[c];
      if (std::isnan(v)) v = std::numeric_limits<float>::infinity();
      uint32_t bits;
      std::memcpy(&bits, &v, sizeof(bits));
      keys[c] = (static_cast<uint64_t>(bits) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(c));
    }
    std::nth_element(keys, keys + k, keys + C, std::greater<uint64_t>());
    for (int64_t i = 0; i < k; ++i) idx[i] = static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(keys[i]));
    std::sort(idx, idx + k);
  } else {
    for (int64_t c = 0; c < C; ++c) idx[c] = static_cast<int32_t>(c);
  }
  int64_t n = 0;
  for (int64_t i = 0; i < k; ++i) {
    const float s = scores[idx[i]];
    if (s != 0.f) {  // a kept channel with score 0 contributes nothing
      idx[n] = idx[i];
      kept_scores[n] = s;
      ++n;
    }
  }
  return n;
}

// Per-(sample, head) weight: [block][tap][kept][block width], scores folded in,
// lanes past n zero. Also the head's bias, padded to width_pad.
void pack_head(const Problem& pr, int64_t h, const int32_t* idx, const float* kept_scores, int64_t k,
               float* w, float* bias_pad) {
  const int64_t n = pr.per_head, taps = pr.taps;
  for (int64_t ci = 0; ci < k; ++ci) {
    const float* src_c = pr.packed + (h * pr.channels + idx[ci]) * taps * n;
    const vf s = splat(kept_scores[ci]);
    const float sc = kept_scores[ci];
    for (int blk = 0; blk < pr.nb; ++blk) {
      const int64_t bw = static_cast<int64_t>(pr.nv[blk]) * VW;
      const int64_t c0 = pr.col0[blk];
      const int64_t valid = std::min<int64_t>(bw, n - c0);
      float* dst_b = w + pr.wblock0[blk] * taps * k + ci * bw;
      for (int64_t t = 0; t < taps; ++t) {
        const float* src = src_c + t * n + c0;
        float* dst = dst_b + t * k * bw;
        int64_t j = 0;
        for (; j + VW <= valid; j += VW) store_u(dst + j, load_u(src + j) * s);
        for (; j < valid; ++j) dst[j] = src[j] * sc;
        for (; j < bw; ++j) dst[j] = 0.f;
      }
    }
  }
  for (int64_t j = 0; j < pr.width_pad; ++j) {
    float v = 0.f;
    if (pr.bias != nullptr && j < n) v = pr.bias[h * n + j];
    bias_pad[j] = v;
  }
}

// Pointers to the channels-last input rows that output pixels [q0, q1) of
// sample b read, [pixel][tap]; a zero row where the tap falls in the padding.
void build_pointers(const Problem& pr, int64_t b, int64_t q0, int64_t q1, const float** ptrs) {
  const int64_t C = pr.channels, W = pr.width, taps = pr.taps;
  const float* xb = pr.x + b * pr.height * W * C;
  // Offsets of the taps from a pixel's top-left tap, for pixels whose taps all fall inside.
  int64_t tap_off[256];
  const bool small = taps <= 256;
  if (small) {
    int64_t t = 0;
    for (int64_t ky = 0; ky < pr.kh; ++ky)
      for (int64_t kx = 0; kx < pr.kw; ++kx) tap_off[t++] = (ky * pr.dy * W + kx * pr.dx) * C;
  }
  const int64_t reach_y = (pr.kh - 1) * pr.dy, reach_x = (pr.kw - 1) * pr.dx;
  int64_t oy = q0 / pr.out_w, ox = q0 % pr.out_w;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t iy0 = oy * pr.sy - pr.py, ix0 = ox * pr.sx - pr.px;
    const float** row = ptrs + (q - q0) * taps;
    if (small && iy0 >= 0 && iy0 + reach_y < pr.height && ix0 >= 0 && ix0 + reach_x < W) {
      const float* base = xb + (iy0 * W + ix0) * C;
      for (int64_t t = 0; t < taps; ++t) row[t] = base + tap_off[t];
    } else {
      for (int64_t ky = 0; ky < pr.kh; ++ky) {
        const int64_t iy = iy0 + ky * pr.dy;
        const bool row_ok = iy >= 0 && iy < pr.height;
        for (int64_t kx = 0; kx < pr.kw; ++kx) {
          const int64_t ix = ix0 + kx * pr.dx;
          *row++ = (row_ok && ix >= 0 && ix < W) ? xb + (iy * W + ix) * C : pr.zero_row;
        }
      }
    }
    if (++ox == pr.out_w) {
      ox = 0;
      ++oy;
    }
  }
}

// Where pixel q of sample b gets head h's block of outputs starting at column c0.
inline float* out_at(const Problem& pr, int64_t b, int64_t h, int64_t c0, int64_t q) {
  return pr.out + (b * pr.pixels + q) * pr.out_channels + h * pr.per_head + c0;
}

// One head's outputs for pixels [q0, q1): every column block, tiles inner.
void conv_head(const Problem& pr, int64_t b, int64_t h, const int32_t* idx, int64_t k, const float* w,
               const float* bias_pad, int64_t q0, int64_t q1, const float* const* ptrs) {
  const KernelTable& table = kernels();
  const int64_t n = pr.per_head;
  for (int blk = 0; blk < pr.nb; ++blk) {
    const int nv = pr.nv[blk];
    const int mr_full = MR_TABLE[nv - 1];
    const int64_t c0 = pr.col0[blk];
    const int valid = static_cast<int>(std::min<int64_t>(static_cast<int64_t>(nv) * VW, n - c0));
    const float* wb = w + pr.wblock0[blk] * pr.taps * k;
    for (int64_t p0 = q0; p0 < q1; p0 += mr_full) {
      const int mr = static_cast<int>(std::min<int64_t>(mr_full, q1 - p0));
      table.fn[nv - 1][mr - 1](ptrs + (p0 - q0) * pr.taps, static_cast<int>(pr.taps), idx, static_cast<int>(k), wb,
                               out_at(pr, b, h, c0, p0), pr.out_channels, bias_pad + c0, valid);
    }
  }
}

// Scores, selection and packed weight of (b, h). Returns k_eff.
int64_t prepare_head(const Problem& pr, const float* pooled, int64_t b, int64_t h, int32_t* idx, float* w,
                     float* bias_pad) {
  HeadScratch& s = thread_scratch();
  float* scores = s.scores.get<float>(pr.channels);
  float* kept_scores = s.kept_scores.get<float>(pr.channels);
  if (pr.scores != nullptr)
    scores = const_cast<float*>(pr.scores) + (b * pr.heads + h) * pr.channels;  // read only
  else if (!pr.unit_scores)
    head_scores(pr, pooled, h, scores, s.squeezed.get<float>(pr.hidden));
  const int64_t k = select_channels(pr, scores, idx, kept_scores);
  pack_head(pr, h, idx, kept_scores, k, w, bias_pad);
  return k;
}

void set_blocks(Problem& pr) {
  const int64_t vectors = (pr.per_head + VW - 1) / VW;
  const int64_t nb = (vectors + NVMAX - 1) / NVMAX;
  TORCH_CHECK(nb <= 64, "dgc_conv2d: too many output channels per head (", pr.per_head, ")");
  pr.nb = static_cast<int>(nb);
  const int64_t base = vectors / nb, rem = vectors % nb;
  int64_t col = 0, wofs = 0;
  for (int64_t i = 0; i < nb; ++i) {
    pr.nv[i] = static_cast<int>(base + (i < rem ? 1 : 0));
    pr.col0[i] = col;
    pr.wblock0[i] = wofs;
    col += pr.nv[i] * VW;
    wofs += pr.nv[i] * VW;
  }
  pr.width_pad = col;
}

// sum[c] += x[q, c] over input pixels [q0, q1) of one sample (channels-last rows).
void pool_rows(const float* xb, int64_t q0, int64_t q1, int64_t C, float* sum) {
  constexpr int NB = 8;
  int64_t c = 0;
  for (; c + NB * VW <= C; c += NB * VW) {
    vf acc[NB];
    for (int i = 0; i < NB; ++i) acc[i] = load_u(sum + c + i * VW);
    for (int64_t q = q0; q < q1; ++q) {
      const float* row = xb + q * C + c;
#pragma GCC unroll 8
      for (int i = 0; i < NB; ++i) acc[i] += load_u(row + i * VW);
    }
    for (int i = 0; i < NB; ++i) store_u(sum + c + i * VW, acc[i]);
  }
  for (; c + VW <= C; c += VW) {
    vf acc = load_u(sum + c);
    for (int64_t q = q0; q < q1; ++q) acc += load_u(xb + q * C + c);
    store_u(sum + c, acc);
  }
  for (; c < C; ++c) {
    float acc = sum[c];
    for (int64_t q = q0; q < q1; ++q) acc += xb[q * C + c];
    sum[c] = acc;
  }
}

// at::parallel_for, run inline when there is one task (a parallel region costs
// a wake-up of the pool, tens of microseconds with OMP_WAIT_POLICY=PASSIVE).
template <typename F>
void parallel_tasks(int64_t tasks, const F& f) {
  if (tasks <= 0) return;
  if (tasks == 1 || at::get_num_threads() == 1) {
    f(0, tasks);
    return;
  }
  at::parallel_for(0, tasks, 1, f);
}

int64_t out_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  return (size + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

}  // namespace

at::Tensor dgc_conv2d(const at::Tensor& x_in, const at::Tensor& reduce_in, const at::Tensor& expand_in,
                      const at::Tensor& beta_in, const at::Tensor& packed_in, const std::optional<at::Tensor>& bias_in,
                      int64_t kept, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                      bool unit_scores, std::optional<double> threshold) {
  TORCH_CHECK(x_in.dim() == 4, "dgc_conv2d: x must be 4-d (B, C, H, W), got ", x_in.dim(), " dims");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && packed_in.scalar_type() == at::kFloat,
              "dgc_conv2d: float32 only, got x ", x_in.scalar_type(), " and weight ", packed_in.scalar_type());
  TORCH_CHECK(x_in.device().is_cpu(), "dgc_conv2d: CPU tensors only");
  TORCH_CHECK(packed_in.dim() == 5, "dgc_conv2d: packed_weight must be (heads, C, kh, kw, C'/heads)");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "dgc_conv2d: stride, padding and dilation must have 2 entries");
  Problem pr{};
  pr.batch = x_in.size(0);
  pr.channels = x_in.size(1);
  pr.height = x_in.size(2);
  pr.width = x_in.size(3);
  pr.heads = packed_in.size(0);
  pr.kh = packed_in.size(2);
  pr.kw = packed_in.size(3);
  pr.per_head = packed_in.size(4);
  pr.out_channels = pr.heads * pr.per_head;
  pr.taps = pr.kh * pr.kw;
  pr.sy = stride[0], pr.sx = stride[1], pr.py = padding[0], pr.px = padding[1];
  pr.dy = dilation[0], pr.dx = dilation[1];
  TORCH_CHECK(packed_in.size(1) == pr.channels, "dgc_conv2d: packed_weight has ", packed_in.size(1),
              " input channels, x has ", pr.channels);
  TORCH_CHECK(pr.sy >= 1 && pr.sx >= 1 && pr.dy >= 1 && pr.dx >= 1 && pr.py >= 0 && pr.px >= 0,
              "dgc_conv2d: bad stride/padding/dilation");
  TORCH_CHECK(kept >= 1 && kept <= pr.channels, "dgc_conv2d: kept must be in [1, ", pr.channels, "], got ", kept);
  TORCH_CHECK(pr.channels < (int64_t(1) << 31), "dgc_conv2d: too many channels");
  pr.out_h = out_size(pr.height, pr.kh, pr.sy, pr.py, pr.dy);
  pr.out_w = out_size(pr.width, pr.kw, pr.sx, pr.px, pr.dx);
  TORCH_CHECK(pr.out_h >= 1 && pr.out_w >= 1, "dgc_conv2d: the kernel does not fit the padded input");
  pr.pixels = pr.out_h * pr.out_w;
  pr.unit_scores = unit_scores;
  pr.use_threshold = threshold.has_value();
  pr.threshold = threshold.has_value() ? static_cast<float>(*threshold) : 0.f;
  pr.kept = pr.use_threshold ? pr.channels : kept;  // the scratch bound: a threshold may keep every channel
  set_blocks(pr);

  at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor packed = packed_in.contiguous();
  at::Tensor reduce, expand, beta, bias;
  if (!unit_scores) {
    TORCH_CHECK(reduce_in.dim() == 3 && reduce_in.size(0) == pr.heads && reduce_in.size(2) == pr.channels,
                "dgc_conv2d: reduce must be (heads, hidden, C)");
    pr.hidden = reduce_in.size(1);
    TORCH_CHECK(expand_in.dim() == 3 && expand_in.size(0) == pr.heads && expand_in.size(1) == pr.channels &&
                    expand_in.size(2) == pr.hidden,
                "dgc_conv2d: expand must be (heads, C, hidden)");
    TORCH_CHECK(beta_in.numel() == pr.heads * pr.channels, "dgc_conv2d: beta must be (heads, C)");
    TORCH_CHECK(reduce_in.scalar_type() == at::kFloat && expand_in.scalar_type() == at::kFloat &&
                    beta_in.scalar_type() == at::kFloat,
                "dgc_conv2d: saliency parameters must be float32");
    reduce = reduce_in.contiguous();
    expand = expand_in.contiguous();
    beta = beta_in.contiguous();
    pr.reduce = reduce.data_ptr<float>();
    pr.expand = expand.data_ptr<float>();
    pr.beta = beta.data_ptr<float>();
  }
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->numel() == pr.out_channels && bias_in->scalar_type() == at::kFloat,
                "dgc_conv2d: bias must be float32 with C' entries");
    bias = bias_in->contiguous();
    pr.bias = bias.data_ptr<float>();
  }
  at::Tensor out = at::empty({pr.batch, pr.out_channels, pr.out_h, pr.out_w},
                             x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (pr.batch == 0) return out;
  pr.x = x.data_ptr<float>();
  pr.packed = packed.data_ptr<float>();
  pr.out = out.data_ptr<float>();

  const int64_t B = pr.batch, C = pr.channels, P_in = pr.height * pr.width;
  const int64_t threads = at::get_num_threads();

  // Caller-side scratch (workers only read it): zero row, pooled means.
  static thread_local Buffer zero_buf, pooled_buf, partial_buf;
  float* zero_row = zero_buf.get<float>(C);
  std::memset(zero_row, 0, C * sizeof(float));
  pr.zero_row = zero_row;

  const int64_t H = pr.heads;
  const int64_t wsize = round_up(pr.taps * pr.kept * pr.width_pad, ALIGN / sizeof(float));  // one head, upper bound
  // Pixel chunks: at most ~96 KB of output rows each.
  const int64_t row_bytes = pr.out_channels * static_cast<int64_t>(sizeof(float));
  const int64_t chunk_px = std::clamp<int64_t>((int64_t(96) << 10) / row_bytes, 24, 480);

  // 2. One task per (sample, group of heads) when those balance over the
  //    threads (heads write disjoint columns): scores,
  //    selection and packed weights of the group's heads, then pixel chunks,
  //    every head of the group per chunk (its input rows stay in cache), with
  //    no synchronisation between the steps. Whole samples when the batch
  //    fills the threads.
  int64_t head_split = 1;
  if (B < threads) {
    head_split = (threads + B - 1) / B;
    while (head_split <= H && (H % head_split != 0 || (B * head_split) % threads != 0)) ++head_split;
  }
  const int64_t fused_tasks = B * head_split;
  const bool fused = head_split <= H &&
                     (threads == 1 || fused_tasks % threads == 0 || fused_tasks >= 4 * threads);
  // Past batch 1 the saliency of all samples is computed together, one task
  // per head, so each saliency weight is read once per call.
  const bool batched = !unit_scores && B > 1;
  // Each task pools its own sample just before using it (when heads are
  // split, every thread of the sample pools it: cheaper than a second
  // parallel region, whose wake-up costs tens of microseconds when the
  // OpenMP threads sleep between regions).
  const bool pool_in_task = fused && !batched;

  // 1. Mean over H*W per (sample, channel), in pixel chunks when the batch
  //    alone cannot keep the threads busy.
  if (!unit_scores && !pool_in_task) {
    const int64_t chunks = B >= threads ? 1 : std::max<int64_t>(1, std::min<int64_t>(threads, P_in / 64));
    float* partial = partial_buf.get<float>(B * chunks * C);
    const float* xp = pr.x;
    parallel_tasks(B * chunks, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks, chunk = task % chunks;
        float* sum = partial + task * C;
        std::memset(sum, 0, C * sizeof(float));
        pool_rows(xp + b * P_in * C, P_in * chunk / chunks, P_in * (chunk + 1) / chunks, C, sum);
      }
    });
    float* pooled = pooled_buf.get<float>(B * C);
    const float inv = static_cast<float>(P_in);
    for (int64_t b = 0; b < B; ++b) {
      float* dst = pooled + b * C;
      std::memcpy(dst, partial + b * chunks * C, C * sizeof(float));
      for (int64_t chunk = 1; chunk < chunks; ++chunk) {
        const float* src = partial + (b * chunks + chunk) * C;
        for (int64_t c = 0; c < C; ++c) dst[c] += src[c];
      }
      for (int64_t c = 0; c < C; ++c) dst[c] /= inv;
    }
    pr.pooled = pooled;
  }
  if (batched) {
    static thread_local Buffer scores_buf;
    float* all_scores = scores_buf.get<float>(B * H * C);
    parallel_tasks(H, [&](int64_t begin, int64_t end) {
      HeadScratch& s = thread_scratch();
      float* squeezed = s.squeezed.get<float>(B * pr.hidden);
      for (int64_t h = begin; h < end; ++h) batch_scores(pr, h, squeezed, all_scores);
    });
    pr.scores = all_scores;
  }

  if (fused) {
    const int64_t per_task = H / head_split;
    // All of the task's heads packed before its pixel chunks (input rows
    // reused across heads) while their weights fit in L2 together.
    const bool heads_at_once = per_task * wsize * static_cast<int64_t>(sizeof(float)) <= (int64_t(512) << 10);
    parallel_tasks(fused_tasks, [&](int64_t begin, int64_t end) {
      HeadScratch& s = thread_scratch();
      float* w = s.weight.get<float>(per_task * wsize);
      int32_t* idx = s.idx.get<int32_t>(per_task * C);
      float* bias_pad = s.bias.get<float>(per_task * pr.width_pad);
      int64_t* ks = s.ks.get<int64_t>(per_task);
      const float** ptrs = s.ptrs.get<const float*>(chunk_px * pr.taps);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / head_split, h0 = task % head_split * per_task;
        const float* pooled_b = nullptr;
        if (!unit_scores) {
          if (pool_in_task) {
            float* own = s.pooled.get<float>(C);
            std::memset(own, 0, C * sizeof(float));
            pool_rows(pr.x + b * P_in * C, 0, P_in, C, own);
            const float inv = static_cast<float>(P_in);
            for (int64_t c = 0; c < C; ++c) own[c] /= inv;
            pooled_b = own;
          } else {
            pooled_b = pr.pooled + b * C;
          }
        }
        if (heads_at_once) {
          for (int64_t i = 0; i < per_task; ++i)
            ks[i] = prepare_head(pr, pooled_b, b, h0 + i, idx + i * C, w + i * wsize, bias_pad + i * pr.width_pad);
          for (int64_t q0 = 0; q0 < pr.pixels; q0 += chunk_px) {
            const int64_t q1 = std::min(pr.pixels, q0 + chunk_px);
            build_pointers(pr, b, q0, q1, ptrs);
            for (int64_t i = 0; i < per_task; ++i)
              conv_head(pr, b, h0 + i, idx + i * C, ks[i], w + i * wsize, bias_pad + i * pr.width_pad, q0, q1, ptrs);
          }
        } else {
          // Large packed weights: one head at a time, so its weight stays in L2.
          for (int64_t i = 0; i < per_task; ++i) {
            const int64_t k = prepare_head(pr, pooled_b, b, h0 + i, idx, w, bias_pad);
            for (int64_t q0 = 0; q0 < pr.pixels; q0 += chunk_px) {
              const int64_t q1 = std::min(pr.pixels, q0 + chunk_px);
              build_pointers(pr, b, q0, q1, ptrs);
              conv_head(pr, b, h0 + i, idx, k, w, bias_pad, q0, q1, ptrs);
            }
          }
        }
      }
    });
    return out;
  }

  // 2'. Samples in groups whose packed weights stay within a cache-sized budget.
  //    Phase A, one task per (sample, head): scores, selection, packed weight.
  //    Phase B, one task per (sample, pixel chunk[, head range]): every head's
  //    outputs for the chunk, so each output row is finished while it is hot.
  const int64_t sample_bytes = H * wsize * static_cast<int64_t>(sizeof(float));
  constexpr int64_t BUDGET = int64_t(6) << 20;
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>(B, BUDGET / std::max<int64_t>(sample_bytes, 1)));
  int64_t chunks = (pr.pixels + chunk_px - 1) / chunk_px;
  static thread_local Buffer wall_buf, idx_buf, bias_buf, k_buf;
  float* wall = wall_buf.get<float>(group * H * wsize);
  int32_t* idx_all = idx_buf.get<int32_t>(group * H * C);
  float* bias_all = bias_buf.get<float>(group * H * pr.width_pad);
  int64_t* k_all = k_buf.get<int64_t>(group * H);
  for (int64_t g0 = 0; g0 < B; g0 += group) {
    const int64_t gb = std::min(group, B - g0);
    parallel_tasks(gb * H, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        k_all[u] = prepare_head(pr, unit_scores ? nullptr : pr.pooled + (g0 + u / H) * C, g0 + u / H, u % H,
                                idx_all + u * C, wall + u * wsize, bias_all + u * pr.width_pad);
      }
    });
    int64_t n_chunks = chunks, head_groups = 1;
    if (threads > 1) {
      n_chunks = std::max(chunks, std::min((2 * threads + gb - 1) / gb, (pr.pixels + 5) / 6));
      if (gb * n_chunks < threads) head_groups = std::min(H, (threads + gb * n_chunks - 1) / (gb * n_chunks));
    }
    const int64_t tasks = gb * n_chunks * head_groups;
    parallel_tasks(tasks, [&](int64_t begin, int64_t end) {
      HeadScratch& s = thread_scratch();
      const int64_t max_px = (pr.pixels + n_chunks - 1) / n_chunks + 1;
      const float** ptrs = s.ptrs.get<const float*>(max_px * pr.taps);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bi = task / (n_chunks * head_groups);
        const int64_t chunk = task / head_groups % n_chunks, hg = task % head_groups;
        const int64_t b = g0 + bi;
        const int64_t q0 = pr.pixels * chunk / n_chunks, q1 = pr.pixels * (chunk + 1) / n_chunks;
        const int64_t h0 = H * hg / head_groups, h1 = H * (hg + 1) / head_groups;
        if (q0 >= q1) continue;
        build_pointers(pr, b, q0, q1, ptrs);
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t u = bi * H + h;
          conv_head(pr, b, h, idx_all + u * C, k_all[u], wall + u * wsize, bias_all + u * pr.width_pad, q0, q1, ptrs);
        }
      }
    });
  }
  return out;
}

// (C', C, kh, kw) -> (heads, C, kh, kw, C'/heads); row (h, c) holds the filters
// of head h over input channel c. Head h's j-th filter is weight[h*n + j].
at::Tensor dgc_pack_weight(const at::Tensor& weight, int64_t heads) {
  TORCH_CHECK(weight.dim() == 4, "dgc_pack_weight: weight must be (C', C, kh, kw)");
  TORCH_CHECK(heads >= 1 && weight.size(0) % heads == 0, "dgc_pack_weight: heads=", heads,
              " does not divide C'=", weight.size(0));
  const int64_t co = weight.size(0), n = co / heads;
  at::Tensor w = weight.to(at::kFloat);
  at::Tensor arranged =
      w.reshape({heads, n, weight.size(1), weight.size(2), weight.size(3)}).permute({0, 2, 3, 4, 1});
  return arranged.contiguous();
}

}  // namespace dgc

TORCH_LIBRARY(dgc_convert, m) {
  m.def(
      "dgc_conv2d(Tensor x, Tensor reduce, Tensor expand, Tensor beta, Tensor packed_weight, Tensor? bias, "
      "int kept, int[2] stride, int[2] padding, int[2] dilation, bool unit_scores, "
      "float? threshold=None) -> Tensor");
  m.def("dgc_pack_weight(Tensor weight, int heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(dgc_convert, CPU, m) { m.impl("dgc_conv2d", &dgc::dgc_conv2d); }

// Plain tensor operations: any device, meta and fake tensors included.
TORCH_LIBRARY_IMPL(dgc_convert, CompositeImplicitAutograd, m) { m.impl("dgc_pack_weight", &dgc::dgc_pack_weight); }
