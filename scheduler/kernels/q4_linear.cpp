// Q4_1 weights times activations rounded to two int8 digits per block of 32, with AVX-512 VNNI
// integer dot products (scheduler/quant.py's `Int4Linear(native=True)`, `--int4-kernel native`).
//
// A weight block of 32 is w = d * q + m, q in 0..15. An activation block of 32, with
// a = max|x| / 127, is rounded to x ~ a * (p + p2 / 128): p = round(x / a), the int8 llama.cpp
// rounds its activations to, and a second digit p2 = round(128 (x / a - p)), |p2| <= 64, for
// the rest (one digit alone moved the embedded model's argmax from the float model's at 16 % of
// positions; two resolve a block to 1/16,000 of its largest value). The block keeps its exact
// float sum S. Then
//
//     sum over the block of w * x  ~  d * (a / 128) * (128 sum(q p) + sum(q p2)) + m * S
//
// with both integer sums exact in int32 (`vpdpbusd`: unsigned 8-bit q times signed 8-bit p).
//
// The 16 lanes of a vector are 16 outputs, not 16 stretches of one input row: for a block, each
// `vpdpbusd` multiplies 4 consecutive weights of 16 outputs by the same 4 activations (broadcast)
// and adds them up in place, so a block is 8 + 8 integer instructions per row for 16 outputs,
// its scales are applied once per block with no horizontal sums, and the weights are unpacked
// once for all rows of the call. aten's int4 kernel turns every weight into a float and pays two
// float operations per weight and row.
//
// Layout, prepared once at load (quant.pack_native): 16 outputs form a tile; `qs` holds, per
// tile and block, 4 runs of 64 bytes: byte 4i + t of run j is output i's weight 8j + t of the
// block in the low nibble and 8j + 4 + t in the high. `d` and `m` hold per tile and block the
// 16 outputs' float16 scales (the file's own values). As 2-D tensors they are [out, in / 2] and
// [out, in / 32], so tiles concatenate and slice like rows.
//
// Each output is summed over blocks in order whatever the number of rows in the call, so a
// token verified among drafts gets the bits it would get decoded alone.
//
// On a CPU with the tile unit (AMX), calls of 16 rows and more take the same integer sums from
// its tile products and apply the same scales in the same order: the same bits (`amx_tile`).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define DSPARK_VNNI 1
#endif

#if defined(DSPARK_VNNI) && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#include "amx_tiles.h"
#define DSPARK_AMX 1
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kTile = 16;      // outputs per vector
constexpr int64_t kRowTile = 4;    // rows sharing one unpacking of the weights
constexpr int32_t kDigit = 128;    // the second digit counts 1/128 of the first
constexpr int64_t kPrefetch = 32;  // blocks ahead whose weights are fetched before use
#if defined(DSPARK_VNNI)
constexpr uint8_t kSignedWeightsOffset = 0x80;  // digit_sums takes signed weights' digits + 128
#else
constexpr uint8_t kSignedWeightsOffset = 0;  // the portable loops read the digits as they are
#endif

// Activation rows: per block of 32 the two int8 digits, the step a / 128 and the exact sum.
// A row's first digits and then its second lie together ([rows, 2, in]), so the digits of
// consecutive rows are one strided run of 2 x rows lines of `in` bytes (what a tile loads).
struct QuantRows {
  int64_t in;
  std::vector<int8_t> digits;    // [rows, 2, in]
  std::vector<float> step, sum;  // [rows, in / 32]
  int8_t* first(int64_t row) { return digits.data() + 2 * in * row; }
  int8_t* second(int64_t row) { return first(row) + in; }
  const int8_t* first(int64_t row) const { return digits.data() + 2 * in * row; }
  const int8_t* second(int64_t row) const { return first(row) + in; }
};

// One block's 32 activations as floats.
inline void load_block(const float* x, float* v) { std::memcpy(v, x, kBlock * sizeof(float)); }
inline void load_block(const c10::BFloat16* x, float* v) {
#if defined(DSPARK_VNNI)
  for (int h = 0; h < 2; ++h) {  // a bfloat16 is a float's upper 16 bits
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16 * h));
    _mm512_store_ps(v + 16 * h, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
  }
#else
  for (int64_t j = 0; j < kBlock; ++j) v[j] = static_cast<float>(x[j]);
#endif
}

// Activation rows rounded block by block; `offset` 0x80 stores each digit plus 128 (an
// unsigned byte's bits), the form vpdpbusd takes against signed weights. Room is made for
// `capacity` rows (zeros past `rows`), so that a tile may read whole groups of rows.
template <typename T>
QuantRows quantise_rows(const T* x, int64_t rows, int64_t in, uint8_t offset, int64_t capacity) {
  const int64_t blocks = in / kBlock, room = std::max(rows, capacity);
  QuantRows q{in, std::vector<int8_t>(room * 2 * in), std::vector<float>(room * blocks),
              std::vector<float>(room * blocks)};
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t at = r * in + b * kBlock;
      alignas(64) float v[kBlock];
      load_block(x + at, v);
#if defined(DSPARK_VNNI)
      const __m512 lo = _mm512_load_ps(v), hi = _mm512_load_ps(v + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      const float total = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
      const float a = amax / 127.f, inv = a > 0.f ? 1.f / a : 0.f;
      const __m512i flip = _mm512_set1_epi32(offset);
      for (int h = 0; h < 2; ++h) {
        const __m512 t = _mm512_mul_ps(h ? hi : lo, _mm512_set1_ps(inv));
        const __m512 first = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512 second = _mm512_roundscale_ps(
            _mm512_mul_ps(_mm512_sub_ps(t, first), _mm512_set1_ps(kDigit)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q.first(r) + b * kBlock + 16 * h),
                         _mm512_cvtepi32_epi8(_mm512_xor_si512(_mm512_cvtps_epi32(first), flip)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q.second(r) + b * kBlock + 16 * h),
                         _mm512_cvtepi32_epi8(_mm512_xor_si512(_mm512_cvtps_epi32(second), flip)));
      }
#else
      float amax = 0.f, total = 0.f;
      for (int64_t j = 0; j < kBlock; ++j) {
        amax = std::max(amax, std::fabs(v[j]));
        total += v[j];
      }
      const float a = amax / 127.f, inv = a > 0.f ? 1.f / a : 0.f;
      for (int64_t j = 0; j < kBlock; ++j) {
        const float t = v[j] * inv, first = std::nearbyint(t);
        q.first(r)[b * kBlock + j] = static_cast<int8_t>(static_cast<int8_t>(first) ^ offset);
        q.second(r)[b * kBlock + j] =
            static_cast<int8_t>(static_cast<int8_t>(std::nearbyint((t - first) * kDigit)) ^ offset);
      }
#endif
      q.step[r * blocks + b] = a / kDigit;
      q.sum[r * blocks + b] = total;
    }
  }
  return q;
}

// 16 outputs stored in the activations' dtype (bfloat16: rounded to nearest even, as aten's
// conversion rounds).
inline void store16(float* y, const float* v) { std::memcpy(y, v, 16 * sizeof(float)); }
inline void store16(c10::BFloat16* y, const float* v) {
#if defined(__AVX512BF16__)
  // One instruction, rounding to nearest even like the scalar conversion (a scalar loop of 16
  // was ~0.2 ms per row a step over the model's 5,184 outputs a layer)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y),
                      (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(v)));
#else
  for (int i = 0; i < 16; ++i) y[i] = c10::BFloat16(v[i]);
#endif
}

#if !defined(DSPARK_VNNI)
// The portable loops: rows [r0, r0 + R) of tile t, output i of a row summed over the blocks
// in order, `block(row, i, b, total)` adding one block's terms.
template <int R, typename Out, typename Block>
void portable_rows(int64_t r0, int64_t t, int64_t blocks, Out* y, int64_t out, Block block) {
  for (int r = 0; r < R; ++r) {
    const int64_t row = r0 + r;
    float v[16];
    for (int64_t i = 0; i < kTile; ++i) {
      float total = 0.f;
      for (int64_t b = 0; b < blocks; ++b) block(row, i, b, total);
      v[i] = total;
    }
    store16(y + row * out + t * kTile, v);
  }
}
#endif

#if defined(DSPARK_VNNI)
// R rows' 16 outputs of tile t, from their accumulators.
template <int R, typename Out>
inline void store_rows(const __m512* acc, int64_t r0, int64_t t, Out* y, int64_t out) {
  for (int r = 0; r < R; ++r) {
    alignas(64) float v[16];
    _mm512_store_ps(v, acc[r]);
    store16(y + (r0 + r) * out + t * kTile, v);
  }
}

// 128 sum(q p) + sum(q p2), from the two digits' sums.
inline __m512i two_digits(__m512i high, __m512i low) {
  return _mm512_add_epi32(_mm512_slli_epi32(high, 7), low);
}

// One block's terms added to a row's accumulator of 16 outputs, from its integer sums (Q4_1:
// d a / 128 x sums + m S; Q8_0: the activations' offsets taken out first). The vector path and
// the tile path both call these, so a row gets the same bits whichever computed its sums.
inline __m512 add_q4_block(__m512 acc, __m512i sums, __m512 dw, __m512 mw, float step, float sum) {
  acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(sum), acc);
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(dw, _mm512_set1_ps(step)), acc);
}
inline __m512 add_q8_block(__m512 acc, __m512i sums, __m512 dw, __m512i offsets, float step) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sums, offsets)),
                         _mm512_mul_ps(dw, _mm512_set1_ps(step)), acc);
}

// 128 sum(q p) + sum(q p2) for one block and 16 outputs, w[k] holding weights 4k..4k+3 of each.
// vpdpbusd multiplies unsigned by signed bytes: Q4 weights (0..15) are the unsigned side; for
// signed Q8 weights the activations' digits come offset by 128 (quantise's `offset`), which
// the caller takes back out.
template <bool kSignedWeights>
inline __m512i digit_sums(const __m512i* w, const int8_t* p, const int8_t* p2) {
  __m512i high = _mm512_setzero_si512(), low = _mm512_setzero_si512();
  for (int k = 0; k < 8; ++k) {
    int32_t four, four2;  // 4 activations' digits, broadcast to the 16 outputs
    std::memcpy(&four, p + 4 * k, 4);
    std::memcpy(&four2, p2 + 4 * k, 4);
    const __m512i a = _mm512_set1_epi32(four), a2 = _mm512_set1_epi32(four2);
    high = kSignedWeights ? _mm512_dpbusd_epi32(high, a, w[k]) : _mm512_dpbusd_epi32(high, w[k], a);
    low = kSignedWeights ? _mm512_dpbusd_epi32(low, a2, w[k]) : _mm512_dpbusd_epi32(low, w[k], a2);
  }
  return two_digits(high, low);
}
#endif

// Rows [r0, r0 + R) of the outputs of tile t of a Q4_1 matrix.
template <int R, typename Out>
void tile4(const QuantRows& xq, int64_t r0, int64_t in, const uint8_t* qs, const c10::Half* d,
           const c10::Half* m, int64_t t, Out* y, int64_t out) {
  const int64_t blocks = in / kBlock;
  const uint8_t* qt = qs + t * blocks * (kTile * kBlock / 2);
  const c10::Half* dt = d + t * blocks * kTile;
  const c10::Half* mt = m + t * blocks * kTile;
#if defined(DSPARK_VNNI)
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* qb = qt + b * (kTile * kBlock / 2);
    // The weights stream from memory once per call (the next tile's follow this one's).
    const char* ahead = reinterpret_cast<const char*>(qb + kPrefetch * (kTile * kBlock / 2));
    for (int line = 0; line < 4; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(dt + (b + kPrefetch) * kTile), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(mt + (b + kPrefetch) * kTile), _MM_HINT_T0);
    __m512i w[8];  // w[k]: weights 4k..4k+3 of the block for the 16 outputs
    for (int j = 0; j < 4; ++j) {
      const __m512i bytes = _mm512_loadu_si512(qb + 64 * j);
      w[2 * j] = _mm512_and_si512(bytes, low4);
      w[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
    }
    const __m512 dw = _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dt + b * kTile)));
    const __m512 mw = _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mt + b * kTile)));
    for (int r = 0; r < R; ++r) {
      const int64_t row = r0 + r, at = b * kBlock;
      const __m512i digits = digit_sums<false>(w, xq.first(row) + at, xq.second(row) + at);
      acc[r] = add_q4_block(acc[r], digits, dw, mw, xq.step[row * blocks + b],
                            xq.sum[row * blocks + b]);
    }
  }
  store_rows<R>(acc, r0, t, y, out);
#else
  portable_rows<R>(r0, t, blocks, y, out, [&](int64_t row, int64_t i, int64_t b, float& total) {
    const uint8_t* qb = qt + b * (kTile * kBlock / 2);
    int32_t digits = 0;
    for (int64_t k = 0; k < 8; ++k) {
      for (int64_t u = 0; u < 4; ++u) {
        const uint8_t byte = qb[64 * (k / 2) + 4 * i + u];
        const int32_t q = k % 2 ? byte >> 4 : byte & 0x0F;
        const int64_t at = b * kBlock + 4 * k + u;
        digits += q * (kDigit * xq.first(row)[at] + xq.second(row)[at]);
      }
    }
    const float step = xq.step[row * blocks + b], sum = xq.sum[row * blocks + b];
    total += static_cast<float>(mt[b * kTile + i]) * sum;
    total += static_cast<float>(digits) * (static_cast<float>(dt[b * kTile + i]) * step);
  });
#endif
}

// Rows [r0, r0 + R) of the outputs of tile t of a Q8_0 matrix (w = d * q, q an int8; the
// embedded model's LM head). The activations' digits go in offset by 128 (digit_sums), and
// each block's sum(q) * (128 * 128 + 128), prepared at load (`c`), takes the offsets back out,
// exactly.
template <int R, typename Out>
void tile8(const QuantRows& xq, int64_t r0, int64_t in, const int8_t* qs, const c10::Half* d,
           const int32_t* c, int64_t t, Out* y, int64_t out) {
  const int64_t blocks = in / kBlock;
  const int8_t* qt = qs + t * blocks * (kTile * kBlock);
  const c10::Half* dt = d + t * blocks * kTile;
  const int32_t* ct = c + t * blocks * kTile;
#if defined(DSPARK_VNNI)
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* qb = qt + b * (kTile * kBlock);
    const char* ahead = reinterpret_cast<const char*>(qb + kPrefetch * (kTile * kBlock));
    for (int line = 0; line < 8; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
    __m512i w[8];  // w[k]: weights 4k..4k+3 of the block for the 16 outputs
    for (int k = 0; k < 8; ++k) w[k] = _mm512_loadu_si512(qb + 64 * k);
    const __m512 dw = _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dt + b * kTile)));
    const __m512i offsets = _mm512_loadu_si512(ct + b * kTile);
    for (int r = 0; r < R; ++r) {
      const int64_t row = r0 + r, at = b * kBlock;
      const __m512i digits = digit_sums<true>(w, xq.first(row) + at, xq.second(row) + at);
      acc[r] = add_q8_block(acc[r], digits, dw, offsets, xq.step[row * blocks + b]);
    }
  }
  store_rows<R>(acc, r0, t, y, out);
#else
  portable_rows<R>(r0, t, blocks, y, out, [&](int64_t row, int64_t i, int64_t b, float& total) {
    const int8_t* qb = qt + b * (kTile * kBlock);
    int32_t digits = 0;
    for (int64_t j = 0; j < kBlock; ++j) {
      const int64_t at = b * kBlock + j;
      digits += qb[64 * (j / 4) + 4 * i + j % 4] * (kDigit * xq.first(row)[at] + xq.second(row)[at]);
    }
    total += static_cast<float>(digits) *
             (static_cast<float>(dt[b * kTile + i]) * xq.step[row * blocks + b]);
  });
#endif
}

#if defined(DSPARK_AMX)
// The same integer sums through the tile unit (AMX), for calls of several rows.
//
// For a tile of 16 outputs, a block of 32 and 8 rows, one tile product gives every row's
// sum(q p) and sum(q p2) at once: the B tile holds the block's weights as 8 lines of 64 bytes
// (line k is w[k] above: weights 4k..4k+3 of each of the 16 outputs, the layout the tile unit
// reads), the A tile the rows' digits where QuantRows keeps them (line 2r: row r's first digits
// of the block, line 2r + 1 its second; 32 bytes each, `in` bytes apart), and the C tile
// receives 16 lines of 16 int32 sums. Then each block's scales are applied through the same
// `add_q4_block` / `add_q8_block` as tile4 / tile8, block by block in order, so an output gets
// the same bits on either path; what the tile unit saves is the 16 broadcasts and 16
// vpdpbusd a row and block cost on the vector path.
//
// The work for one tile of outputs goes in three passes, each over all its blocks: unpack the
// Q4 nibbles to bytes, the tile products (two blocks in flight), the scales. Interleaved block
// by block, each tile load waited for the vector stores just before it (a tile load does not
// take data from pending stores) and each product for the previous one, and the call cost more
// than the vector path at every row count.
//
// Even so the tile unit saves less here than its raw speed suggests: a block of 32 is all one
// product sums before its scales must be applied, so every block pays tile loads and stores
// and a pass of the vector loop. The embedded model's compiled step, both paths in one process
// on 2 cores: 16 rows 1.07-1.14x faster, 24 rows 1.12x, 32 rows 1.20-1.25x; 4-12 rows
// 0.75-0.98x (a group of 8 rows is padded, and few rows mostly wait for the weights to stream
// in). So the tiles serve from 16 rows: the batches of decodes and their
// verifications under load, not one request's verification.
constexpr int64_t kAmxRows = 8;  // rows per tile product: two lines of digits each
// Calls with fewer rows take the vector path (`amx_min_rows` moves it, for benchmarks).
std::atomic<int64_t> amx_min_rows_now{16};

// Two sets of (C, A, B) tiles, 0-2 and 3-5, for 8 rows (a constant: amx_tiles.h).
dspark_amx::TileConfig tile_config() {
  dspark_amx::TileConfig c;
  for (int set : {0, 3}) {
    c.rows[set] = 2 * kAmxRows, c.colsb[set] = 64;              // C: the sums
    c.rows[set + 1] = 2 * kAmxRows, c.colsb[set + 1] = kBlock;  // A: the digits
    c.rows[set + 2] = 8, c.colsb[set + 2] = 64;                 // B: the weights
  }
  return c;
}
const dspark_amx::TileConfig kTileConfig = tile_config();

// Per thread: a tile's unpacked weights, and a group of rows' sums, for every block; lines
// of 64 bytes on cache lines, as the aligned vector loads and stores need.
struct AmxScratch {
  explicit AmxScratch(int64_t blocks)
      : weights(new (std::align_val_t(64)) uint8_t[blocks * 512]),
        sums(new (std::align_val_t(64)) int32_t[blocks * 2 * kAmxRows * kTile]) {}
  ~AmxScratch() {
    ::operator delete[](weights, std::align_val_t(64));
    ::operator delete[](sums, std::align_val_t(64));
  }
  AmxScratch(const AmxScratch&) = delete;
  AmxScratch& operator=(const AmxScratch&) = delete;
  uint8_t* weights;  // [blocks, 8 x 64]
  int32_t* sums;     // [blocks, 16 x 16]
};

// All rows of the outputs of tile t, of a Q4_1 matrix (`m`: its minimums) or a Q8_0 one (`c`:
// its offsets, see tile8). xq has room for whole groups of 8 rows.
template <bool kQ8, typename Out>
void amx_tile(const QuantRows& xq, int64_t rows, int64_t in, const uint8_t* qs,
              const c10::Half* d, const c10::Half* m, const int32_t* c, int64_t t, Out* y,
              int64_t out, AmxScratch& scratch) {
  const int64_t blocks = in / kBlock;
  constexpr int64_t kBlockBytes = kQ8 ? kTile * kBlock : kTile * kBlock / 2;
  constexpr int64_t kSums = 2 * kAmxRows * kTile;  // per block
  const uint8_t* weights = qs + t * blocks * kBlockBytes;  // Q8_0: stored as the tile reads it
  if constexpr (!kQ8) {  // unpacked as tile4 unpacks into w[]
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    uint8_t* w = scratch.weights;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* qb = weights + b * kBlockBytes;
      for (int j = 0; j < 4; ++j) {
        const __m512i bytes = _mm512_loadu_si512(qb + 64 * j);
        _mm512_store_si512(w + 512 * b + 128 * j, _mm512_and_si512(bytes, low4));
        _mm512_store_si512(w + 512 * b + 128 * j + 64,
                           _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4));
      }
    }
    weights = w;
  }
  int32_t* sums = scratch.sums;
  const c10::Half* dt = d + t * blocks * kTile;
  for (int64_t r0 = 0; r0 < rows; r0 += kAmxRows) {
    const int8_t* digits = xq.first(r0);
    // Block `blk`'s sums through the tile set (C, A, B); the tile intrinsics take their tile
    // numbers as literals (spliced into the assembly), hence a macro. Signed digits times the
    // unsigned nibbles; for Q8_0 digits offset by 128 times the signed weights, as vpdpbusd.
#define DSPARK_BLOCK_SUMS(C, A, B, blk)                     \
  do {                                                     \
    _tile_loadd(B, weights + (blk) * 512, 64);             \
    _tile_loadd(A, digits + (blk) * kBlock, in);           \
    _tile_zero(C);                                         \
    if constexpr (kQ8)                                     \
      _tile_dpbusd(C, A, B);                               \
    else                                                   \
      _tile_dpbsud(C, A, B);                               \
    _tile_stored(C, sums + (blk) * kSums, 64);             \
  } while (0)
    int64_t b = 0;
    for (; b + 1 < blocks; b += 2) {  // two blocks in flight: tile sets 0-2 and 3-5
      DSPARK_BLOCK_SUMS(0, 1, 2, b);
      DSPARK_BLOCK_SUMS(3, 4, 5, b + 1);
    }
    if (b < blocks) DSPARK_BLOCK_SUMS(0, 1, 2, b);
#undef DSPARK_BLOCK_SUMS
    __m512 acc[kAmxRows];  // all 8 rows, padding included: a fixed loop keeps them in registers
    for (int r = 0; r < kAmxRows; ++r) acc[r] = _mm512_setzero_ps();
    for (b = 0; b < blocks; ++b) {
      const __m512 dw = _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dt + b * kTile)));
      __m512 mw = _mm512_setzero_ps();
      __m512i offsets = _mm512_setzero_si512();
      if constexpr (kQ8)
        offsets = _mm512_loadu_si512(c + (t * blocks + b) * kTile);
      else
        mw = _mm512_cvtph_ps(_mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(m + (t * blocks + b) * kTile)));
      const int32_t* at = sums + b * kSums;
#pragma GCC unroll 8
      for (int r = 0; r < kAmxRows; ++r) {
        const int64_t row = r0 + r;
        const __m512i digits = two_digits(_mm512_load_si512(at + 2 * kTile * r),
                                          _mm512_load_si512(at + 2 * kTile * r + kTile));
        const float step = xq.step[row * blocks + b];
        acc[r] = kQ8 ? add_q8_block(acc[r], digits, dw, offsets, step)
                     : add_q4_block(acc[r], digits, dw, mw, step, xq.sum[row * blocks + b]);
      }
    }
    for (int r = 0; r < kAmxRows && r0 + r < rows; ++r) {
      alignas(64) float v[16];
      _mm512_store_ps(v, acc[r]);
      store16(y + (r0 + r) * out + t * kTile, v);
    }
  }
}

// Every tile of the output through the tile unit.
template <bool kQ8>
at::Tensor amx_by_tiles(const at::Tensor& x, const QuantRows& xq, int64_t out, const uint8_t* qs,
                        const c10::Half* d, const c10::Half* m, const int32_t* c) {
  const int64_t rows = x.size(0), in = x.size(1), blocks = in / kBlock;
  at::Tensor y = at::empty({rows, out}, x.options());
  auto run = [&](auto* yp) {
    at::parallel_for(0, out / kTile, 1, [&](int64_t t0, int64_t t1) {
      AmxScratch scratch(blocks);
      _tile_loadconfig(&kTileConfig);  // per thread
      for (int64_t t = t0; t < t1; ++t) amx_tile<kQ8>(xq, rows, in, qs, d, m, c, t, yp, out, scratch);
      _tile_release();
    });
  };
  if (x.scalar_type() == at::kBFloat16)
    run(y.data_ptr<c10::BFloat16>());
  else
    run(y.data_ptr<float>());
  return y;
}

bool amx_serves(int64_t rows) { return rows >= amx_min_rows_now && dspark_amx::permitted(); }

// Rows rounded up to whole groups of 8 where the tiles serve the call.
int64_t amx_capacity(int64_t rows) {
  return amx_serves(rows) ? (rows + kAmxRows - 1) / kAmxRows * kAmxRows : rows;
}
#else
int64_t amx_capacity(int64_t rows) { return rows; }
#endif

// From how many rows a call takes the tile path; returns the previous value, or -1 where this
// build has no tile path (no AMX, or the kernel would not grant it).
int64_t amx_min_rows(int64_t rows) {
#if defined(DSPARK_AMX)
  if (dspark_amx::permitted()) return amx_min_rows_now.exchange(rows);
#endif
  return -1;
}

// Rows a call's products pay for in whole groups of: kAmxRows where the tile path serves (from
// amx_min_rows rows on, a call of 17 rows costs what one of 24 does), 1 where there is none.
// The throughput profile prices verified drafts by it (scheduler/profiler.py, row_quantum).
int64_t tile_rows() {
#if defined(DSPARK_AMX)
  if (dspark_amx::permitted()) return kAmxRows;
#endif
  return 1;
}

QuantRows quantise(const at::Tensor& x, uint8_t offset = 0, int64_t capacity = 0) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "x must be bfloat16 or float32");
  return x.scalar_type() == at::kBFloat16
             ? quantise_rows(x.data_ptr<c10::BFloat16>(), x.size(0), x.size(1), offset, capacity)
             : quantise_rows(x.data_ptr<float>(), x.size(0), x.size(1), offset, capacity);
}

// Every tile of the output, each for all rows (its weights stay in cache meanwhile), over the
// threads; `tile(R, r0, t, y)` computes R rows of tile t.
template <typename Tile>
at::Tensor by_tiles(const at::Tensor& x, int64_t out, Tile tile) {
  const int64_t rows = x.size(0);
  at::Tensor y = at::empty({rows, out}, x.options());
  auto run = [&](auto* yp) {
    at::parallel_for(0, out / kTile, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t r0 = 0;
        for (; r0 + kRowTile <= rows; r0 += kRowTile) tile(std::integral_constant<int, 4>{}, r0, t, yp);
        switch (rows - r0) {
          case 3: tile(std::integral_constant<int, 3>{}, r0, t, yp); break;
          case 2: tile(std::integral_constant<int, 2>{}, r0, t, yp); break;
          case 1: tile(std::integral_constant<int, 1>{}, r0, t, yp); break;
          default: break;
        }
      }
    });
  };
  if (x.scalar_type() == at::kBFloat16)
    run(y.data_ptr<c10::BFloat16>());
  else
    run(y.data_ptr<float>());
  return y;
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                     const at::Tensor& m) {
  TORCH_CHECK(x.dim() == 2 && qs.dim() == 2 && d.dim() == 2 && m.dim() == 2,
              "q4_linear: x [rows, in], qs [out, in/2], d and m [out, in/32]");
  const int64_t in = x.size(1), out = qs.size(0);
  TORCH_CHECK(in % kBlock == 0 && out % kTile == 0,
              "q4_linear: in must be a multiple of 32 and out of 16");
  TORCH_CHECK(qs.size(1) == in / 2 && qs.scalar_type() == at::kByte,
              "q4_linear: qs [out, in/2] uint8");
  TORCH_CHECK(d.sizes() == m.sizes() && d.size(0) == out && d.size(1) == in / kBlock &&
                  d.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf,
              "q4_linear: d and m [out, in/32] float16");
  const at::Tensor xc = x.contiguous(), qc = qs.contiguous(), dc = d.contiguous(),
                   mc = m.contiguous();
  const QuantRows xq = quantise(xc, 0, amx_capacity(xc.size(0)));
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const c10::Half *dp = dc.data_ptr<c10::Half>(), *mp = mc.data_ptr<c10::Half>();
#if defined(DSPARK_AMX)
  if (amx_serves(xc.size(0))) return amx_by_tiles<false>(xc, xq, out, qp, dp, mp, nullptr);
#endif
  return by_tiles(xc, out, [&](auto rows, int64_t r0, int64_t t, auto* yp) {
    tile4<decltype(rows)::value>(xq, r0, in, qp, dp, mp, t, yp, out);
  });
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                     const at::Tensor& c) {
  TORCH_CHECK(x.dim() == 2 && qs.dim() == 2 && d.dim() == 2 && c.dim() == 2,
              "q8_linear: x [rows, in], qs [out, in], d and c [out, in/32]");
  const int64_t in = x.size(1), out = qs.size(0);
  TORCH_CHECK(in % kBlock == 0 && out % kTile == 0,
              "q8_linear: in must be a multiple of 32 and out of 16");
  TORCH_CHECK(qs.size(1) == in && qs.scalar_type() == at::kChar, "q8_linear: qs [out, in] int8");
  TORCH_CHECK(d.sizes() == c.sizes() && d.size(0) == out && d.size(1) == in / kBlock &&
                  d.scalar_type() == at::kHalf && c.scalar_type() == at::kInt,
              "q8_linear: d [out, in/32] float16, c [out, in/32] int32");
  const at::Tensor xc = x.contiguous(), qc = qs.contiguous(), dc = d.contiguous(),
                   cc = c.contiguous();
  const QuantRows xq = quantise(xc, kSignedWeightsOffset, amx_capacity(xc.size(0)));
  const int8_t* qp = qc.data_ptr<int8_t>();
  const c10::Half* dp = dc.data_ptr<c10::Half>();
  const int32_t* cp = cc.data_ptr<int32_t>();
#if defined(DSPARK_AMX)
  if (amx_serves(xc.size(0)))
    return amx_by_tiles<true>(xc, xq, out, reinterpret_cast<const uint8_t*>(qp), dp, nullptr, cp);
#endif
  return by_tiles(xc, out, [&](auto rows, int64_t r0, int64_t t, auto* yp) {
    tile8<decltype(rows)::value>(xq, r0, in, qp, dp, cp, t, yp, out);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dspark_kernels, lib) {
  lib.def("q4_linear(Tensor x, Tensor qs, Tensor d, Tensor m) -> Tensor");
  lib.def("q8_linear(Tensor x, Tensor qs, Tensor d, Tensor c) -> Tensor");
  lib.def("amx_min_rows(int rows) -> int");
  lib.def("tile_rows() -> int");
}

TORCH_LIBRARY_IMPL(dspark_kernels, CompositeExplicitAutograd, lib) {
  lib.impl("amx_min_rows", &amx_min_rows);
  lib.impl("tile_rows", &tile_rows);
}

TORCH_LIBRARY_IMPL(dspark_kernels, CPU, lib) {
  lib.impl("q4_linear", &q4_linear);
  lib.impl("q8_linear", &q8_linear);
}
