// Decode attention over the paged KV cache, one new token per sequence, on the CPU.
//
// Reads each sequence's K/V rows where they lie in the pool (no gather into a padded copy,
// which costs as much memory traffic as the attention itself) and accumulates in float32
// whatever the cache dtype. One task per (sequence, KV head) computes all the query heads
// that share that KV head, so every K/V row is loaded once for the whole group.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec.h"

namespace {

#if defined(__AVX512F__)
using namespace kvrelay_vec;
#endif


template <typename T>
inline void prefetch_row(const T* p, int64_t dim) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < dim * static_cast<int64_t>(sizeof(T)); off += 64)
    _mm_prefetch(bytes + off, _MM_HINT_T0);
}

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

#if defined(__AVX512F__)
// The lane sums of 16 vectors, in order: a transposing add tree, ~3 operations per sum where
// reducing each vector alone costs ~8.
inline __m512 sum16(const __m512* v) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: v[2i], v[2i+1], v[2i], v[2i+1]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: that lane's sums of v[4i .. 4i+3]
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xee));
  for (int i = 0; i < 2; ++i)  // lanes: half sums of v[8i .. 8i+3] (two), of v[8i+4 ..] (two)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88),
                       _mm512_shuffle_f32x4(w[0], w[1], 0xdd));
}

// Scores of `group` query heads against rows 0..n-1 (visited in order by for_each_row), into
// scores[g * n + t]. Each row's products stay a vector until 16 rows are summed at once.
template <int CHUNKS, typename T, typename ForEachRow>
void scores_fixed(const float* q, int64_t group, int64_t n, ForEachRow&& for_each_row,
                  const T* k_cache, float* partial, float* scores) {
  for_each_row(k_cache, [&](int64_t t, const T* k) {
    __m512 row[CHUNKS];
    for (int c = 0; c < CHUNKS; ++c) row[c] = load16(k + 16 * c);
    const int64_t slot = t % 16;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * CHUNKS * 16;
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qg), row[0]);
      for (int c = 1; c < CHUNKS; ++c)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * c), row[c], acc);
      _mm512_store_ps(partial + (g * 16 + slot) * 16, acc);
    }
    if (slot == 15 || t == n - 1) {
      const int64_t count = slot + 1;
      for (int64_t g = 0; g < group; ++g) {
        __m512 rows[16];
        for (int64_t i = 0; i < 16; ++i)
          rows[i] = i < count ? _mm512_load_ps(partial + (g * 16 + i) * 16) : _mm512_setzero_ps();
        _mm512_mask_storeu_ps(scores + g * n + t - slot, static_cast<__mmask16>((1u << count) - 1),
                              sum16(rows));
      }
    }
  });
}

// out[g] = sum over rows t of p[g * n + t] * v_t, the GROUP x CHUNKS sums held in registers.
template <int CHUNKS, int GROUP, typename T, typename ForEachRow>
void values_fixed(const float* p, int64_t n, ForEachRow&& for_each_row, const T* v_cache,
                  float* out) {
  __m512 acc[GROUP][CHUNKS];
  for (int g = 0; g < GROUP; ++g)
    for (int c = 0; c < CHUNKS; ++c) acc[g][c] = _mm512_setzero_ps();
  for_each_row(v_cache, [&](int64_t t, const T* v) {
    __m512 row[CHUNKS];
    for (int c = 0; c < CHUNKS; ++c) row[c] = load16(v + 16 * c);
    for (int g = 0; g < GROUP; ++g) {
      const __m512 w = _mm512_set1_ps(p[g * n + t]);
      for (int c = 0; c < CHUNKS; ++c) acc[g][c] = _mm512_fmadd_ps(w, row[c], acc[g][c]);
    }
  });
  for (int g = 0; g < GROUP; ++g)
    for (int c = 0; c < CHUNKS; ++c) _mm512_storeu_ps(out + (g * CHUNKS + c) * 16, acc[g][c]);
}

// values_fixed for the group sizes whose sums fit the 32 vector registers; false otherwise.
template <int CHUNKS, typename T, typename ForEachRow>
bool values_in_registers(int64_t group, const float* p, int64_t n, ForEachRow&& for_each_row,
                         const T* v_cache, float* out) {
  if (group * CHUNKS > 24) return false;
  switch (group) {
    case 1: values_fixed<CHUNKS, 1>(p, n, for_each_row, v_cache, out); return true;
    case 2: values_fixed<CHUNKS, 2>(p, n, for_each_row, v_cache, out); return true;
    case 3: values_fixed<CHUNKS, 3>(p, n, for_each_row, v_cache, out); return true;
    case 4: values_fixed<CHUNKS, 4>(p, n, for_each_row, v_cache, out); return true;
    case 5: values_fixed<CHUNKS, 5>(p, n, for_each_row, v_cache, out); return true;
    case 6: values_fixed<CHUNKS, 6>(p, n, for_each_row, v_cache, out); return true;
    default: return false;
  }
}

// Groups too large for values_fixed: a V row widened once for all the group's heads.
template <int CHUNKS, typename T>
inline void add_fixed(float* acc, const float* p, int64_t p_stride, const T* v, int64_t group) {
  __m512 row[CHUNKS];
  for (int c = 0; c < CHUNKS; ++c) row[c] = load16(v + 16 * c);
  for (int64_t g = 0; g < group; ++g) {
    const __m512 w = _mm512_set1_ps(p[g * p_stride]);
    float* a = acc + g * CHUNKS * 16;
    for (int c = 0; c < CHUNKS; ++c)
      _mm512_storeu_ps(a + 16 * c, _mm512_fmadd_ps(w, row[c], _mm512_loadu_ps(a + 16 * c)));
  }
}
#endif

// Scores of `group` query heads (float, pre-scaled) against one K row.
template <typename T>
inline void dot_rows(const float* q, const T* k, int64_t group, int64_t dim, float* out,
                     int64_t out_stride) {
#if defined(__AVX512F__)
  if (dim % 16 == 0) {
    for (int64_t g = 0; g < group; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t d = 0; d < dim; d += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * dim + d), load16(k + d), acc);
      out[g * out_stride] = _mm512_reduce_add_ps(acc);
    }
    return;
  }
#endif
  for (int64_t g = 0; g < group; ++g) {
    float s = 0.f;
    for (int64_t d = 0; d < dim; ++d) s += q[g * dim + d] * static_cast<float>(k[d]);
    out[g * out_stride] = s;
  }
}

// acc[g] += p[g * p_stride] * v for each of `group` heads.
template <typename T>
inline void add_rows(float* acc, const float* p, int64_t p_stride, const T* v, int64_t group,
                     int64_t dim) {
#if defined(__AVX512F__)
  if (dim == 64) return add_fixed<4>(acc, p, p_stride, v, group);
  if (dim == 128) return add_fixed<8>(acc, p, p_stride, v, group);
  if (dim % 16 == 0) {
    for (int64_t d = 0; d < dim; d += 16) {
      const __m512 vv = load16(v + d);
      for (int64_t g = 0; g < group; ++g) {
        float* a = acc + g * dim + d;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(p[g * p_stride]), vv,
                                            _mm512_loadu_ps(a)));
      }
    }
    return;
  }
#endif
  for (int64_t g = 0; g < group; ++g) {
    const float w = p[g * p_stride];
    for (int64_t d = 0; d < dim; ++d) acc[g * dim + d] += w * static_cast<float>(v[d]);
  }
}


// s[t] = exp(s[t] - max(s)) in place; returns their sum.
inline float exp_shifted(float* s, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  float sum = 0.f;
  int64_t t = 0;
#if defined(__AVX512F__)
  __m512 vtop = _mm512_set1_ps(top);
  for (; t + 16 <= n; t += 16) vtop = _mm512_max_ps(vtop, _mm512_loadu_ps(s + t));
  top = _mm512_reduce_max_ps(vtop);
  for (; t < n; ++t) top = std::max(top, s[t]);
  const __m512 shift = _mm512_set1_ps(top);
  __m512 vsum = _mm512_setzero_ps();
  for (t = 0; t + 16 <= n; t += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), shift));
    _mm512_storeu_ps(s + t, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  sum = _mm512_reduce_add_ps(vsum);
#else
  for (; t < n; ++t) top = std::max(top, s[t]);
  t = 0;
#endif
  for (; t < n; ++t) {
    s[t] = std::exp(s[t] - top);
    sum += s[t];
  }
  return sum;
}

template <typename T>
void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& page_table, const at::Tensor& seq_lens, double scale,
                      int64_t window, at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t page_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t group = heads / kv_heads;
  const int64_t q_seq = q.stride(0), q_head = q.stride(1);
  const int64_t max_pages = page_table.size(1);
  const int64_t token_stride = kv_heads * dim;  // one token's row, all KV heads
  const int64_t page_stride = page_size * token_stride;
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* table = page_table.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), acc(group * dim), scores, inv_sum(group);
#if defined(__AVX512F__)
    std::vector<__m512> partial(static_cast<size_t>(group * 16));  // 64-byte aligned
#endif
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads;
      const int64_t len = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      const int64_t* pages = table + b * max_pages;
      // Visits this head's rows of positions first .. len-1 page by page (no division per
      // row). Rows jump to another page every page_size tokens, where the hardware
      // prefetcher loses the stream, so the next page's rows are fetched ahead by hand.
      auto for_each_row = [&](const T* cache, auto&& visit) {
        int64_t t = 0, pos = first;
        while (t < n) {
          const int64_t page = pos / page_size, offset = pos % page_size;
          const int64_t count = std::min(page_size - offset, n - t);
          if (t + count < n) {
            const T* next = cache + pages[page + 1] * page_stride + h * dim;
            const int64_t next_count = std::min(page_size, n - t - count);
            for (int64_t i = 0; i < next_count; ++i) prefetch_row(next + i * token_stride, dim);
          }
          const T* base = cache + pages[page] * page_stride + offset * token_stride + h * dim;
          for (int64_t i = 0; i < count; ++i) visit(t + i, base + i * token_stride);
          t += count;
          pos += count;
        }
      };
      scores.resize(group * n);
      for (int64_t g = 0; g < group; ++g) {
        float* dst = qf.data() + g * dim;
        to_float(qp + b * q_seq + (h * group + g) * q_head, dst, dim);
        for (int64_t d = 0; d < dim; ++d) dst[d] *= fscale;
      }
      bool fixed = false;  // head_dim 64 or 128 on AVX-512: the register-held paths
#if defined(__AVX512F__)
      auto* part = reinterpret_cast<float*>(partial.data());
      if (dim == 64) {
        scores_fixed<4>(qf.data(), group, n, for_each_row, kp, part, scores.data());
        fixed = true;
      } else if (dim == 128) {
        scores_fixed<8>(qf.data(), group, n, for_each_row, kp, part, scores.data());
        fixed = true;
      }
#endif
      if (!fixed) {
        for_each_row(kp, [&](int64_t t, const T* k) {
          dot_rows(qf.data(), k, group, dim, scores.data() + t, n);
        });
      }
      for (int64_t g = 0; g < group; ++g) inv_sum[g] = 1.f / exp_shifted(scores.data() + g * n, n);
      bool summed = false;
#if defined(__AVX512F__)
      if (dim == 64)
        summed = values_in_registers<4>(group, scores.data(), n, for_each_row, vp, acc.data());
      else if (dim == 128)
        summed = values_in_registers<8>(group, scores.data(), n, for_each_row, vp, acc.data());
#endif
      if (!summed) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for_each_row(vp, [&](int64_t t, const T* v) {
          add_rows(acc.data(), scores.data() + t, n, v, group, dim);
        });
      }
      for (int64_t g = 0; g < group; ++g) {
        T* dst = op + (b * heads + h * group + g) * dim;
        const float* a = acc.data() + g * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<T>(a[d] * inv_sum[g]);
      }
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& page_table,
                                  const at::Tensor& seq_lens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q: [seqs, heads, head_dim], last dim dense");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "caches: contiguous [pages, page_size, kv_heads, head_dim]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache differ in shape");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(k_cache.size(3) == q.size(2), "head_dim of q and the caches differ");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(page_table.scalar_type() == at::kLong && page_table.is_contiguous() &&
                  page_table.dim() == 2 && page_table.size(0) == q.size(0),
              "page_table: contiguous int64 [seqs, max_pages]");
  TORCH_CHECK(seq_lens.scalar_type() == at::kLong && seq_lens.is_contiguous() &&
                  seq_lens.numel() == q.size(0),
              "seq_lens: contiguous int64 [seqs]");
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  if (q.scalar_type() == at::kFloat) {
    decode_attention<float>(q, k_cache, v_cache, page_table, seq_lens, scale, window, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    decode_attention<at::BFloat16>(q, k_cache, v_cache, page_table, seq_lens, scale, window, out);
  } else if (q.scalar_type() == at::kHalf) {
    decode_attention<at::Half>(q, k_cache, v_cache, page_table, seq_lens, scale, window, out);
  } else {
    TORCH_CHECK(false, "paged_decode_attention: unsupported dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvrelay, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table, "
      "Tensor seq_lens, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvrelay, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
