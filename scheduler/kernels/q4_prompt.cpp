// Prompt chunks' products straight from the GGUF's Q4_1 blocks: each block dequantised into
// bfloat16 in a cache-sized scratch and multiplied by the chunk's rows in the tile unit's
// bfloat16 products (AMX-BF16). Served for prompt chunks (scheduler/quant.py's `Int4Linear`),
// where it replaces the dense bf16 copy of every layer.
//
// A prompt chunk of 17-64 rows spent ~20 ms of its ~27-40 ms in the layers' dense products,
// over a 212 MB bf16 copy of the weights at ~9 GB/s (docs/benchmarks.md). The integer path of
// q4_linear.cpp reads a quarter of the bytes, but applies each block's scales row by row in a
// vector pass (a block of 32 is all an integer tile product may sum), so from ~24 rows it
// costs more than the dense copy. Here a weight is dequantised once a call, w = d * q + m
// rounded to bfloat16 (the dense copy's values), and the tile unit sums the products over the
// whole input for 16 rows and 16 outputs at once in float32: no per-block pass over the rows.
//
// Per pair of tiles of 16 outputs (one thread's unit of work): every block of both tiles is
// unpacked into the B-tile layout of `tdpbf16ps`, 16 lines of 64 bytes per block, line k
// holding for each output the pair of weights 2k and 2k + 1 (q4_linear.cpp's run j, nibble h,
// byte 4i + t holds output i's weight 8j + 4h + t, so a line is every other 16-bit word of one
// nibble plane); then, for each group of up to 32 rows, the products over the blocks in order
// accumulate in four C tiles (2 row tiles x 2 output tiles; a last tile alone takes groups of
// 64 rows). The tiles are unpacked whole before the first tile load: a tile load does not take
// data from pending vector stores.
//
// A row's sums go through the tile unit in the same order whatever the other rows, so a row gets
// the same bits alone or in a chunk of any size.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <new>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && \
    defined(__AVX512BW__) && defined(__linux__)
#include <immintrin.h>

#include "amx_tiles.h"
#define DSPARK_AMX_BF16 1
#endif

namespace {

constexpr int64_t kBlock = 32;       // weights per Q4 block, along the input
constexpr int64_t kTile = 16;        // outputs per tile
constexpr int64_t kLines = 16;       // B-tile lines per block: pairs of weights
constexpr int64_t kTileRows = 16;    // rows per A and C tile
constexpr int64_t kGroupTiles = 4;   // C tiles: up to 64 rows per pass over the blocks

#if defined(DSPARK_AMX_BF16)
// Tiles 0-3: C, 16 rows x 16 float32 sums; 4-5: A, 16 rows x 32 bfloat16 inputs (two, so a
// load need not wait for the product still reading the other); 6-7: B, a block's weights of
// one tile of outputs each.
dspark_amx::TileConfig tile_config() {
  dspark_amx::TileConfig c;
  for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  return c;
}
const dspark_amx::TileConfig kTileConfig = tile_config();

// Block b of tile t into its 16 B lines at `lines` (bfloat16 pairs, 64 bytes a line).
inline void unpack_block(const uint8_t* qb, const c10::Half* d, const c10::Half* m,
                         c10::BFloat16* lines) {
  // Scales per lane: lanes 2i and 2i + 1 of a line's first half are output i's pair (0-7),
  // of its second half output 8 + i's.
  const __m512 d16 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d)));
  const __m512 m16 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m)));
  const __m512i pairs_low = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i pairs_high = _mm512_add_epi32(pairs_low, _mm512_set1_epi32(8));
  const __m512 d_low = _mm512_permutexvar_ps(pairs_low, d16);
  const __m512 d_high = _mm512_permutexvar_ps(pairs_high, d16);
  const __m512 m_low = _mm512_permutexvar_ps(pairs_low, m16);
  const __m512 m_high = _mm512_permutexvar_ps(pairs_high, m16);
  // Every other 16-bit word: even words (weights t = 0, 1) to the low half, odd (t = 2, 3)
  // to the high half.
  const __m512i even_odd = _mm512_set_epi16(
      31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1,
      30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  auto line = [&](__m256i q32, int k) {  // 32 nibbles as bytes: 16 outputs' pairs
    const __m512 lo = _mm512_fmadd_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(q32))), d_low, m_low);
    const __m512 hi = _mm512_fmadd_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(q32, 1))), d_high,
        m_high);
    _mm512_store_si512(lines + 32 * k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  };
  for (int j = 0; j < 4; ++j) {
    const __m512i bytes = _mm512_loadu_si512(qb + 64 * j);
    for (int h = 0; h < 2; ++h) {
      const __m512i plane =
          _mm512_and_si512(h ? _mm512_srli_epi16(bytes, 4) : bytes, low4);
      const __m512i split = _mm512_permutexvar_epi16(even_odd, plane);
      // weight 8j + 4h + t sits in line 4j + 2h + t / 2
      line(_mm512_castsi512_si256(split), 4 * j + 2 * h);
      line(_mm512_extracti64x4_epi64(split, 1), 4 * j + 2 * h + 1);
    }
  }
}

// The products of up to 64 rows of `a` (lda bytes from row to row) and one or two tiles of
// outputs (`w[0]`, `w[1]`: their unpacked blocks), summed over the blocks in order, into
// `sums`: per output tile 64 lines of 16 float32, line r row r. kRows A tiles of 16 rows each.
// One tile of outputs: C tiles 0..kRows-1, a B load a block for up to four products. Two: C
// tiles 0-3 (2 x 2), each A load serving both tiles' products, halving how often the chunk's
// rows are read again, once per tile of outputs (512 rows: 65.7 against 69.1 ms).
template <int kRows, int kOuts>
void tile_products(const uint8_t* a, int64_t lda, const c10::BFloat16* const* w, int64_t blocks,
                   float* sums) {
  static_assert((kOuts == 1 && kRows <= 4) || (kOuts == 2 && kRows <= 2));
  const auto* w0 = reinterpret_cast<const uint8_t*>(w[0]);
  const auto* w1 = reinterpret_cast<const uint8_t*>(w[kOuts - 1]);
  const int64_t next = kTileRows * lda;  // bytes from one A tile's rows to the next's
  constexpr int kC = kRows * kOuts;
  _tile_zero(0);
  if constexpr (kC > 1) _tile_zero(1);
  if constexpr (kC > 2) _tile_zero(2);
  if constexpr (kC > 3) _tile_zero(3);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* ab = a + b * kBlock * 2;
    const int64_t wb = b * kLines * 64;
    if constexpr (kOuts == 1) {
      _tile_loadd(6, w0 + wb, 64);
      _tile_loadd(4, ab, lda);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (kRows > 1) {
        _tile_loadd(5, ab + next, lda);
        _tile_dpbf16ps(1, 5, 6);
      }
      if constexpr (kRows > 2) {
        _tile_loadd(4, ab + 2 * next, lda);
        _tile_dpbf16ps(2, 4, 6);
      }
      if constexpr (kRows > 3) {
        _tile_loadd(5, ab + 3 * next, lda);
        _tile_dpbf16ps(3, 5, 6);
      }
    } else {  // C tile 2r + o: rows r, outputs o
      _tile_loadd(6, w0 + wb, 64);
      _tile_loadd(7, w1 + wb, 64);
      _tile_loadd(4, ab, lda);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (kRows > 1) {
        _tile_loadd(5, ab + next, lda);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  constexpr int64_t kLine = kTile;                    // floats per C line
  constexpr int64_t kOut = kGroupTiles * kTileRows * kLine;  // floats per output tile's sums
  if constexpr (kOuts == 1) {
    _tile_stored(0, sums, 64);
    if constexpr (kRows > 1) _tile_stored(1, sums + 16 * kLine, 64);
    if constexpr (kRows > 2) _tile_stored(2, sums + 32 * kLine, 64);
    if constexpr (kRows > 3) _tile_stored(3, sums + 48 * kLine, 64);
  } else {
    _tile_stored(0, sums, 64);
    _tile_stored(1, sums + kOut, 64);
    if constexpr (kRows > 1) {
      _tile_stored(2, sums + 16 * kLine, 64);
      _tile_stored(3, sums + kOut + 16 * kLine, 64);
    }
  }
}

struct Scratch {  // per thread, on cache lines as the aligned stores need
  explicit Scratch(int64_t blocks)
      : weights(new (std::align_val_t(64)) c10::BFloat16[2 * blocks * kLines * 32]),
        sums(new (std::align_val_t(64)) float[2 * kGroupTiles * kTileRows * kTile]) {}
  ~Scratch() {
    ::operator delete[](weights, std::align_val_t(64));
    ::operator delete[](sums, std::align_val_t(64));
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  c10::BFloat16* weights;  // [2 output tiles, blocks, 16 lines, 32]
  float* sums;             // [2 output tiles, 64 rows, 16 outputs]
};
#endif

// Whether q4_bf16_linear serves on this CPU (built with AMX-BF16, tiles granted).
bool q4_bf16_available() {
#if defined(DSPARK_AMX_BF16)
  return dspark_amx::permitted();
#else
  return false;
#endif
}

at::Tensor q4_bf16_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                          const at::Tensor& m) {
  TORCH_CHECK(q4_bf16_available(), "q4_bf16_linear: this CPU or build has no AMX-BF16 tiles");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16,
              "q4_bf16_linear: x [rows, in] bfloat16");
  const int64_t rows = x.size(0), in = x.size(1), out = qs.size(0), blocks = in / kBlock;
  TORCH_CHECK(in % kBlock == 0 && out % kTile == 0 && qs.size(1) == in / 2 &&
                  qs.scalar_type() == at::kByte,
              "q4_bf16_linear: qs [out, in/2] uint8, in a multiple of 32, out of 16");
  TORCH_CHECK(d.sizes() == m.sizes() && d.size(0) == out && d.size(1) == blocks &&
                  d.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf,
              "q4_bf16_linear: d and m [out, in/32] float16");
  at::Tensor y = at::empty({rows, out}, x.options());
#if defined(DSPARK_AMX_BF16)
  // The rows padded to whole A tiles (zeros: their sums are dropped).
  const int64_t padded = (rows + kTileRows - 1) / kTileRows * kTileRows;
  at::Tensor xp = x.contiguous();
  if (padded != rows) {
    xp = at::zeros({padded, in}, x.options());
    xp.narrow(0, 0, rows).copy_(x);
  }
  const c10::BFloat16* xa = xp.data_ptr<c10::BFloat16>();
  const at::Tensor qc = qs.contiguous(), dc = d.contiguous(), mc = m.contiguous();
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const c10::Half *dp = dc.data_ptr<c10::Half>(), *mp = mc.data_ptr<c10::Half>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  const int64_t lda = in * 2;  // bytes from row to row
  // A thread's unit of work is a pair of output tiles (the last may be alone).
  const int64_t tiles = out / kTile, pairs = (tiles + 1) / 2;
  at::parallel_for(0, pairs, 1, [&](int64_t p0, int64_t p1) {
    Scratch scratch(blocks);
    const c10::BFloat16* w[2] = {scratch.weights, scratch.weights + blocks * kLines * 32};
    _tile_loadconfig(&kTileConfig);  // per thread
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t t0 = 2 * p, outs = std::min<int64_t>(2, tiles - t0);
      for (int64_t o = 0; o < outs; ++o) {
        for (int64_t b = 0; b < blocks; ++b) {
          const int64_t blk = (t0 + o) * blocks + b;  // the native layout: tile by tile
          unpack_block(qp + blk * kTile * kBlock / 2, dp + blk * kTile, mp + blk * kTile,
                       scratch.weights + (o * blocks + b) * kLines * 32);
        }
      }
      const int64_t group = outs == 2 ? 2 : kGroupTiles;  // A tiles per pass over the blocks
      for (int64_t r0 = 0; r0 < padded; r0 += group * kTileRows) {
        const int64_t a_tiles = std::min<int64_t>(group, (padded - r0) / kTileRows);
        const auto* a = reinterpret_cast<const uint8_t*>(xa + r0 * in);
        float* sums = scratch.sums;
        if (outs == 2) {
          if (a_tiles == 2)
            tile_products<2, 2>(a, lda, w, blocks, sums);
          else
            tile_products<1, 2>(a, lda, w, blocks, sums);
        } else {
          switch (a_tiles) {
            case 1: tile_products<1, 1>(a, lda, w, blocks, sums); break;
            case 2: tile_products<2, 1>(a, lda, w, blocks, sums); break;
            case 3: tile_products<3, 1>(a, lda, w, blocks, sums); break;
            default: tile_products<4, 1>(a, lda, w, blocks, sums); break;
          }
        }
        const int64_t last = std::min(rows, r0 + a_tiles * kTileRows);
        for (int64_t o = 0; o < outs; ++o) {
          const float* so = sums + o * kGroupTiles * kTileRows * kTile;
          for (int64_t r = r0; r < last; ++r) {
            const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(so + (r - r0) * kTile));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(yp + r * out + (t0 + o) * kTile), v);
          }
        }
      }
    }
    _tile_release();
  });
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dspark_kernels, lib) {
  lib.def("q4_bf16_linear(Tensor x, Tensor qs, Tensor d, Tensor m) -> Tensor");
  lib.def("q4_bf16_available() -> bool");
}

TORCH_LIBRARY_IMPL(dspark_kernels, CompositeExplicitAutograd, lib) {
  lib.impl("q4_bf16_available", &q4_bf16_available);
}

TORCH_LIBRARY_IMPL(dspark_kernels, CPU, lib) { lib.impl("q4_bf16_linear", &q4_bf16_linear); }
