// Attention of a step's packed rows over their requests' cached keys and values, for the
// compiled decode step (scheduler/compiled.py).
//
// Row n belongs to a request in cache slot `slot`, whose query starts at position `start` and
// whose first new token is packed row `first`; the row sits at position `pos` and attends
// positions 0..pos: below `start` from the cache, from `start` on from the step's own new keys
// and values (row first + j - start), which the cache gets only after the step.
//
// Inductor's loops for the same formula took ~5.5 us per cached position per token (30
// layers); the keys and values of a position are 23 KB, under 1 us at the memory's speed.
// Here each (row, key/value head) pair reads its keys and values once for the query heads
// that share them, in float32 with a vectorised exp, positions in order: a row's output does
// not depend on the other rows of the step, so a token verified among drafts gets the bits it
// would get decoded alone.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxGroup = 8;  // query heads per key/value head held in registers

#if defined(__AVX512F__)

constexpr int kLanes = 16;

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  // bfloat16 is the high half of a float32
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// exp(x) for x <= 0 (scores minus their maximum): 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2],
// p the degree-6 Taylor polynomial (relative error under 2e-7 there).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// One (row, kv head): q [G, D] float32, keys(j) / values(j) -> D elements, out [G, D].
template <typename KV, int D, typename KeyAt, typename ValueAt>
void attend(const float* q, int64_t group, int64_t len, KeyAt key_at, ValueAt value_at,
            float* scores, float* out) {
  constexpr int V = D / kLanes;
  __m512 qv[kMaxGroup][V];
  for (int64_t g = 0; g < group; ++g)
    for (int v = 0; v < V; ++v) qv[g][v] = load16(q + g * D + v * kLanes);
  for (int64_t j = 0; j < len; ++j) {
    const KV* k = key_at(j);
    __m512 kv[V];
    for (int v = 0; v < V; ++v) kv[v] = load16(k + v * kLanes);
    for (int64_t g = 0; g < group; ++g) {
      __m512 acc = _mm512_mul_ps(qv[g][0], kv[0]);
      for (int v = 1; v < V; ++v) acc = _mm512_fmadd_ps(qv[g][v], kv[v], acc);
      scores[g * len + j] = _mm512_reduce_add_ps(acc);
    }
  }
  float total[kMaxGroup];
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * len;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < len; ++j) top = std::max(top, s[j]);
    __m512 sum = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + kLanes <= len; j += kLanes) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), _mm512_set1_ps(top)));
      _mm512_storeu_ps(s + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (j < len) {
      const __mmask16 tail = (__mmask16)((1u << (len - j)) - 1);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + j), _mm512_set1_ps(top)));
      _mm512_mask_storeu_ps(s + j, tail, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
    }
    total[g] = _mm512_reduce_add_ps(sum);
  }
  __m512 acc[kMaxGroup][V];
  for (int64_t g = 0; g < group; ++g)
    for (int v = 0; v < V; ++v) acc[g][v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; ++j) {
    const KV* val = value_at(j);
    __m512 vv[V];
    for (int v = 0; v < V; ++v) vv[v] = load16(val + v * kLanes);
    for (int64_t g = 0; g < group; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * len + j]);
      for (int v = 0; v < V; ++v) acc[g][v] = _mm512_fmadd_ps(p, vv[v], acc[g][v]);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const __m512 inv = _mm512_set1_ps(1.0f / total[g]);
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(out + g * D + v * kLanes, _mm512_mul_ps(acc[g][v], inv));
  }
}

#else  // portable: the same arithmetic a lane at a time

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename KV, int D, typename KeyAt, typename ValueAt>
void attend(const float* q, int64_t group, int64_t len, KeyAt key_at, ValueAt value_at,
            float* scores, float* out) {
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * len;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < len; ++j) {
      const KV* k = key_at(j);
      float dot = 0;
      for (int d = 0; d < D; ++d) dot += q[g * D + d] * to_float(k[d]);
      s[j] = dot;
      top = std::max(top, dot);
    }
    float total = 0;
    for (int64_t j = 0; j < len; ++j) total += (s[j] = std::exp(s[j] - top));
    float* o = out + g * D;
    for (int d = 0; d < D; ++d) o[d] = 0;
    for (int64_t j = 0; j < len; ++j) {
      const KV* v = value_at(j);
      for (int d = 0; d < D; ++d) o[d] += s[j] * to_float(v[d]);
    }
    for (int d = 0; d < D; ++d) o[d] /= total;
  }
}

#endif

template <typename KV, int D>
void attend_all(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& rows,
                at::Tensor& out) {
  const int64_t n_rows = q.size(0), kv_heads = q.size(1), group = q.size(2);
  const int64_t max_len = k_cache.size(2);
  const float* qp = q.data_ptr<float>();
  const KV* kn = k_new.data_ptr<KV>();
  const KV* vn = v_new.data_ptr<KV>();
  const KV* kc = k_cache.data_ptr<KV>();
  const KV* vc = v_cache.data_ptr<KV>();
  const int64_t* meta = rows.data_ptr<int64_t>();  // per row: id, pos, slot, start, first
  float* op = out.data_ptr<float>();
  for (int64_t n = 0; n < n_rows; ++n) {  // checked here: a worker thread must not throw
    const int64_t* r = meta + n * 5;
    const int64_t pos = r[1], slot = r[2], start = r[3], first = r[4];
    TORCH_CHECK(slot >= 0 && slot < k_cache.size(0) && pos < max_len && start >= 0 &&
                    start <= pos && first >= 0 && first + pos - start < n_rows,
                "row ", n, ": slot, positions or rows out of range");
  }
  at::parallel_for(0, n_rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / kv_heads, h = item % kv_heads;
      const int64_t* r = meta + n * 5;
      const int64_t pos = r[1], slot = r[2], start = r[3], first = r[4];
      const int64_t len = pos + 1;
      scores.resize(group * len);
      const KV* k_cached = kc + ((slot * kv_heads + h) * max_len) * D;
      const KV* v_cached = vc + ((slot * kv_heads + h) * max_len) * D;
      // Position j >= start is the step's own packed row first + j - start.
      auto own = [&](int64_t j) { return ((first + j - start) * kv_heads + h) * D; };
      auto key_at = [&](int64_t j) { return j < start ? k_cached + j * D : kn + own(j); };
      auto value_at = [&](int64_t j) { return j < start ? v_cached + j * D : vn + own(j); };
      attend<KV, D>(qp + (n * kv_heads + h) * group * D, group, len, key_at, value_at,
                    scores.data(), op + (n * kv_heads + h) * group * D);
    }
  });
}

// q [N, KV, G, D] (any float dtype), k_new / v_new [N, KV, D] and the layer's caches
// [slots, KV, max_len, D] in the cache dtype, rows [N, 5] int64 -> [N, KV, G, D] float32.
at::Tensor row_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                         const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& rows) {
  TORCH_CHECK(q.dim() == 4 && k_new.dim() == 3 && k_cache.dim() == 4, "q [N, KV, G, D], k_new [N, KV, D], cache [slots, KV, len, D]");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 2 && rows.size(1) == 5, "rows: [N, 5] int64");
  TORCH_CHECK(k_new.size(0) == q.size(0) && rows.size(0) == q.size(0) && k_new.sizes() == v_new.sizes() &&
                  k_new.size(1) == q.size(1) && k_cache.size(1) == q.size(1) &&
                  k_new.size(2) == q.size(3) && k_cache.size(3) == q.size(3) &&
                  k_cache.sizes() == v_cache.sizes(),
              "q, new keys/values, cache and rows disagree on rows, heads or head size");
  TORCH_CHECK(q.size(2) <= kMaxGroup, "at most ", kMaxGroup, " query heads per key/value head");
  TORCH_CHECK(k_new.scalar_type() == k_cache.scalar_type() && v_new.scalar_type() == k_cache.scalar_type() &&
              v_cache.scalar_type() == k_cache.scalar_type(), "keys and values in the cache's dtype");
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  const at::Tensor kn = k_new.contiguous(), vn = v_new.contiguous(), meta = rows.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches: contiguous");
  at::Tensor out = at::empty(q.sizes(), qf.options());
  const int64_t d = q.size(3);
  const bool bf16 = k_cache.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || k_cache.scalar_type() == at::kFloat, "cache dtype: bfloat16 or float32");
#define DSPARK_ATTEND(D)                                                                     \
  if (d == D) {                                                                              \
    if (bf16) attend_all<c10::BFloat16, D>(qf, kn, vn, k_cache, v_cache, meta, out);         \
    else attend_all<float, D>(qf, kn, vn, k_cache, v_cache, meta, out);                      \
    return out;                                                                              \
  }
  DSPARK_ATTEND(32)
  DSPARK_ATTEND(64)
  DSPARK_ATTEND(128)
  DSPARK_ATTEND(256)
#undef DSPARK_ATTEND
  TORCH_CHECK(false, "head_dim ", d, ": only 32, 64, 128 and 256 are built");
}

}  // namespace

TORCH_LIBRARY(dspark_kernels, lib) {
  lib.def("row_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor k_cache, Tensor v_cache, Tensor rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(dspark_kernels, CPU, lib) { lib.impl("row_attention", &row_attention); }
