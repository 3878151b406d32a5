// Q4_1 weights times int8-quantised activations, llama.cpp's scheme for its Q4 matrices, with
// AVX-512 VNNI integer dot products (scheduler/quant.py's `Q4Linear`).
//
// A weight block of 32 is w = d * q + m, q in 0..15. An activation block of 32 is rounded to
// x ~ a * p, p an int8 (a = max|x| / 127), and keeps its exact float sum S. Then
//
//     sum over the block of w * x  ~  d * a * sum(q * p) + m * S
//
// where sum(q * p) is exact in int32 (`vpdpbusd`: unsigned 8-bit q times signed 8-bit p). aten's
// int4 kernel instead turns every weight into a float and pays two float operations per weight
// and row; here a 64-weight pair of blocks costs one integer instruction per row, plus one
// conversion and one multiply-add for its scales.
//
// Layout, prepared once at load: `qs` [out, in / 2] bytes, each 32 bytes holding a pair of
// blocks (byte j: block 2k's weight j in the low nibble, block 2k+1's weight j in the high),
// so one 32-byte load and one shift give 64 weights in the activations' own order; `d` and `m`
// [out, in / 32] float32.
//
// Each output is summed in the same order whatever the number of rows in the call, so a token
// verified among drafts gets the bits it would get decoded alone.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define DSPARK_VNNI 1
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kRowTile = 4;    // rows sharing one unpacking of the weights
constexpr int64_t kPrefetchRows = 2;  // output rows ahead whose weights are prefetched
constexpr int64_t kGroupPairs = 4;  // pairs of blocks whose products are summed in integers

// The weights are walked in segments: groups of 4 pairs of blocks (256 weights), then single
// pairs. A segment's integer products are folded into 16 lanes and scaled once: in a group
// each block owns 2 lanes, in a single pair 8. block_of(lane) says which block of the segment.
inline int64_t block_of(int64_t lane, bool group) {
  return group ? lane / 4 + 4 * ((lane % 4) / 2) : lane / 8;
}

struct Segments {
  int64_t groups, tail, count;  // groups of 4 pairs, single pairs after them, both
  explicit Segments(int64_t in)
      : groups(in / 64 / kGroupPairs), tail(in / 64 % kGroupPairs), count(groups + tail) {}
  int64_t first_block(int64_t s) const {
    return s < groups ? 8 * s : 8 * groups + 2 * (s - groups);
  }
};

// Activation rows rounded to int8 per block of 32, and per segment 32 floats: each lane's
// block scale, then the block's exact sum over its lane count (exact: a power of two), so that
// 16 lanes of m times them add up to m * S over the segment's blocks.
struct QuantRows {
  std::vector<int8_t> p;     // [rows, in]
  std::vector<float> lanes;  // [rows, segments, 32]
};

template <typename T>
QuantRows quantise_rows(const T* x, int64_t rows, int64_t in) {
  const int64_t blocks = in / kBlock;
  const Segments seg(in);
  QuantRows q{std::vector<int8_t>(rows * in), std::vector<float>(rows * seg.count * 32)};
  std::vector<float> scale(blocks), sum(blocks);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const T* xb = x + r * in + b * kBlock;
      float amax = 0.f, total = 0.f;
      for (int64_t j = 0; j < kBlock; ++j) {
        const float v = static_cast<float>(xb[j]);
        amax = std::max(amax, std::fabs(v));
        total += v;
      }
      const float a = amax / 127.f, inv = a > 0.f ? 1.f / a : 0.f;
      int8_t* pb = q.p.data() + r * in + b * kBlock;
      for (int64_t j = 0; j < kBlock; ++j)
        pb[j] = static_cast<int8_t>(std::nearbyint(static_cast<float>(xb[j]) * inv));
      scale[b] = a;
      sum[b] = total;
    }
    for (int64_t s = 0; s < seg.count; ++s) {
      const bool group = s < seg.groups;
      float* lanes = q.lanes.data() + (r * seg.count + s) * 32;
      for (int64_t lane = 0; lane < 16; ++lane) {
        const int64_t b = seg.first_block(s) + block_of(lane, group);
        lanes[lane] = scale[b];
        lanes[16 + lane] = sum[b] / (group ? 2.f : 8.f);
      }
    }
  }
  return q;
}

#if defined(DSPARK_VNNI)
// 64 weights of a pair of blocks, in the activations' order: low nibbles then high nibbles.
inline __m512i unpack_pair(const uint8_t* packed) {
  const __m512i shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed));
  return _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i64x4(bytes), shifts),
                          _mm512_set1_epi8(0x0F));
}

// A segment's per-block scales (d or m of its blocks, float16) spread over the lanes.
inline __m512 spread(const at::Half* v, bool group) {
  if (group) {
    const __m512i idx = _mm512_setr_epi32(0, 0, 4, 4, 1, 1, 5, 5, 2, 2, 6, 6, 3, 3, 7, 7);
    const __m256 eight = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
    return _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(eight));
  }
  const float first = static_cast<float>(v[0]), second = static_cast<float>(v[1]);
  return _mm512_insertf32x8(_mm512_set1_ps(first), _mm256_set1_ps(second), 1);
}

// Four pairs' integer products folded so that each of the 8 blocks owns 2 lanes (block_of).
inline __m512i fold_group(__m512i d0, __m512i d1, __m512i d2, __m512i d3) {
  // 128-bit chunks: a pair's product is [first block: c0 c1 | second block: c2 c3]
  const __m512i s01 = _mm512_add_epi32(_mm512_shuffle_i32x4(d0, d1, 0x88),   // c0 c2 of both
                                       _mm512_shuffle_i32x4(d0, d1, 0xDD));  // c1 c3 of both
  const __m512i s23 = _mm512_add_epi32(_mm512_shuffle_i32x4(d2, d3, 0x88),
                                       _mm512_shuffle_i32x4(d2, d3, 0xDD));
  // s01 holds blocks 0-3, s23 blocks 4-7, 4 lanes each; halve the lanes per block
  return _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
}
#endif

// Rows [r0, r0 + R) of the output for weight rows [o0, o1).
template <int R>
void tile(const QuantRows& xq, int64_t r0, int64_t in, const uint8_t* qs, const at::Half* d,
          const at::Half* m, int64_t o0, int64_t o1, float* y, int64_t out) {
  const int64_t blocks = in / kBlock;
  const Segments seg(in);
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* qo = qs + o * (in / 2);
    const at::Half* dO = d + o * blocks;
    const at::Half* mO = m + o * blocks;
#if defined(DSPARK_VNNI)
    // The weights stream from memory once per call: ask for a later output's ahead of use.
    if (o + kPrefetchRows < o1) {
      const char* ahead = reinterpret_cast<const char*>(qs + (o + kPrefetchRows) * (in / 2));
      for (int64_t line = 0; line < in / 2; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(d + (o + kPrefetchRows) * blocks), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(m + (o + kPrefetchRows) * blocks), _MM_HINT_T0);
    }
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t s = 0; s < seg.count; ++s) {
      const bool group = s < seg.groups;
      const int64_t b0 = seg.first_block(s);
      const __m512 dw = spread(dO + b0, group), mw = spread(mO + b0, group);
      const uint8_t* qseg = qo + 16 * b0;
      if (group) {
        const __m512i w0 = unpack_pair(qseg), w1 = unpack_pair(qseg + 32),
                      w2 = unpack_pair(qseg + 64), w3 = unpack_pair(qseg + 96);
        for (int r = 0; r < R; ++r) {
          const int8_t* p = xq.p.data() + (r0 + r) * in + kBlock * b0;
          const __m512i z = _mm512_setzero_si512();
          const __m512i dot = fold_group(
              _mm512_dpbusd_epi32(z, w0, _mm512_loadu_si512(p)),
              _mm512_dpbusd_epi32(z, w1, _mm512_loadu_si512(p + 64)),
              _mm512_dpbusd_epi32(z, w2, _mm512_loadu_si512(p + 128)),
              _mm512_dpbusd_epi32(z, w3, _mm512_loadu_si512(p + 192)));
          const float* lanes = xq.lanes.data() + ((r0 + r) * seg.count + s) * 32;
          acc[r] = _mm512_fmadd_ps(mw, _mm512_loadu_ps(lanes + 16), acc[r]);
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                   _mm512_mul_ps(_mm512_loadu_ps(lanes), dw), acc[r]);
        }
      } else {
        const __m512i w = unpack_pair(qseg);
        for (int r = 0; r < R; ++r) {
          const int8_t* p = xq.p.data() + (r0 + r) * in + kBlock * b0;
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(p));
          const float* lanes = xq.lanes.data() + ((r0 + r) * seg.count + s) * 32;
          acc[r] = _mm512_fmadd_ps(mw, _mm512_loadu_ps(lanes + 16), acc[r]);
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                   _mm512_mul_ps(_mm512_loadu_ps(lanes), dw), acc[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) y[(r0 + r) * out + o] = _mm512_reduce_add_ps(acc[r]);
#else
    for (int r = 0; r < R; ++r) {
      const int8_t* p = xq.p.data() + (r0 + r) * in;
      float total = 0.f;
      for (int64_t s = 0; s < seg.count; ++s) {
        const bool group = s < seg.groups;
        const int64_t b0 = seg.first_block(s), nblocks = group ? 8 : 2;
        const float* lanes = xq.lanes.data() + ((r0 + r) * seg.count + s) * 32;
        for (int64_t i = 0; i < nblocks; ++i) {
          const int64_t b = b0 + i, lane = group ? (i % 4) * 4 + 2 * (i / 4) : 8 * i;
          int32_t dot = 0;
          for (int64_t j = 0; j < kBlock; ++j) {
            const int64_t k = b / 2, shift = 4 * (b % 2);
            dot += ((qo[32 * k + j] >> shift) & 0x0F) * p[b * kBlock + j];
          }
          const float per_lane = group ? 2.f : 8.f;
          total += static_cast<float>(dot) * (lanes[lane] * static_cast<float>(dO[b])) +
                   per_lane * (static_cast<float>(mO[b]) * lanes[16 + lane]);
        }
      }
      y[(r0 + r) * out + o] = total;
    }
#endif
  }
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                     const at::Tensor& m) {
  TORCH_CHECK(x.dim() == 2 && qs.dim() == 2 && d.dim() == 2 && m.dim() == 2,
              "q4_linear: x [rows, in], qs [out, in/2], d and m [out, in/32]");
  const int64_t rows = x.size(0), in = x.size(1), out = qs.size(0);
  TORCH_CHECK(in % (2 * kBlock) == 0, "q4_linear: in must be a multiple of 64");
  TORCH_CHECK(qs.size(1) == in / 2 && qs.scalar_type() == at::kByte, "q4_linear: qs [out, in/2] uint8");
  TORCH_CHECK(d.sizes() == m.sizes() && d.size(0) == out && d.size(1) == in / kBlock &&
                  d.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf,
              "q4_linear: d and m [out, in/32] float16");
  const at::Tensor xc = x.contiguous();
  const at::Tensor qc = qs.contiguous(), dc = d.contiguous(), mc = m.contiguous();
  const QuantRows xq = x.scalar_type() == at::kBFloat16
                           ? quantise_rows(xc.data_ptr<c10::BFloat16>(), rows, in)
                           : quantise_rows(xc.to(at::kFloat).data_ptr<float>(), rows, in);
  at::Tensor y = at::empty({rows, out}, x.options().dtype(at::kFloat));
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const at::Half *dp = dc.data_ptr<at::Half>(), *mp = mc.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, 16, [&](int64_t o0, int64_t o1) {
    int64_t r0 = 0;
    for (; r0 + kRowTile <= rows; r0 += kRowTile) tile<4>(xq, r0, in, qp, dp, mp, o0, o1, yp, out);
    switch (rows - r0) {
      case 3: tile<3>(xq, r0, in, qp, dp, mp, o0, o1, yp, out); break;
      case 2: tile<2>(xq, r0, in, qp, dp, mp, o0, o1, yp, out); break;
      case 1: tile<1>(xq, r0, in, qp, dp, mp, o0, o1, yp, out); break;
      default: break;
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dspark_kernels, lib) {
  lib.def("q4_linear(Tensor x, Tensor qs, Tensor d, Tensor m) -> Tensor");
}

TORCH_LIBRARY_IMPL(dspark_kernels, CPU, lib) { lib.impl("q4_linear", &q4_linear); }
