// Fused elementwise steps of a decoder layer on the CPU, each one pass over its rows
// instead of several torch ops. Rounding follows transformers' op order in the model dtype,
// so bfloat16 results match the unfused torch code: every intermediate that torch would
// store in the model dtype is rounded to it here too.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "vec.h"

namespace {

template <typename T>
inline T round_to(float x) {
  return static_cast<T>(x);
}

// Rows per parallel task: small batches stay on one thread (a fork costs more than them).
inline int64_t grain_for(int64_t row_elems) { return std::max<int64_t>(1, 16384 / row_elems); }

// residual += x (rounded), then out = weight * T(r * rsqrt(mean(r^2) + eps)) with r the
// updated residual in float32 (transformers' LlamaRMSNorm).
template <typename T>
void add_rms_norm_rows(T* residual, const T* x, const T* weight, T* out, int64_t rows,
                       int64_t hidden, float eps) {
  at::parallel_for(0, rows, grain_for(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* h = residual + r * hidden;
      float sum = 0.f;
      int64_t i = 0;
#if defined(__AVX512F__)
      if constexpr (!std::is_same_v<T, double>) {
        // 16 partial sums (torch's own reduction is not sequential either).
        using namespace kvrelay_vec;
        __m512 sums = _mm512_setzero_ps();
        for (; i + 16 <= hidden; i += 16) {
          __m512 v = load16(h + i);
          if (x != nullptr) {
            v = round16<T>(_mm512_add_ps(v, load16(x + r * hidden + i)));
            store16(h + i, v);
          }
          sums = _mm512_fmadd_ps(v, v, sums);
        }
        sum = _mm512_reduce_add_ps(sums);
      }
#endif
      for (; i < hidden; ++i) {
        float v = static_cast<float>(h[i]);
        if (x != nullptr) {
          h[i] = round_to<T>(v + static_cast<float>(x[r * hidden + i]));
          v = static_cast<float>(h[i]);
        }
        sum += v * v;
      }
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(hidden) + eps);
      T* o = out + r * hidden;
      i = 0;
#if defined(__AVX512F__)
      if constexpr (!std::is_same_v<T, double>) {
        using namespace kvrelay_vec;
        const __m512 scale = _mm512_set1_ps(inv);
        for (; i + 16 <= hidden; i += 16) {
          const __m512 normed = round16<T>(_mm512_mul_ps(load16(h + i), scale));
          store16(o + i, _mm512_mul_ps(load16(weight + i), normed));
        }
      }
#endif
      for (; i < hidden; ++i) {
        const float normed = static_cast<float>(round_to<T>(static_cast<float>(h[i]) * inv));
        o[i] = round_to<T>(static_cast<float>(weight[i]) * normed);
      }
    }
  });
}

at::Tensor add_rms_norm(at::Tensor residual, const c10::optional<at::Tensor>& x,
                        const at::Tensor& weight, double eps) {
  TORCH_CHECK(residual.dim() == 2 && residual.is_contiguous(), "residual: contiguous [rows, hidden]");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == residual.size(1) && weight.is_contiguous(),
              "weight: [hidden]");
  TORCH_CHECK(weight.scalar_type() == residual.scalar_type(), "weight and residual dtypes differ");
  at::Tensor xc;
  if (x.has_value()) {
    xc = x->contiguous();
    TORCH_CHECK(xc.sizes() == residual.sizes() && xc.scalar_type() == residual.scalar_type(),
                "x must match residual");
  }
  auto out = at::empty_like(residual);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, residual.scalar_type(), "add_rms_norm",
                                  [&] {
                                    add_rms_norm_rows<scalar_t>(
                                        residual.data_ptr<scalar_t>(),
                                        x.has_value() ? xc.data_ptr<scalar_t>() : nullptr,
                                        weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                        residual.size(0), residual.size(1),
                                        static_cast<float>(eps));
                                  });
  return out;
}

// Rotary (rotate_half layout) of q and k heads at their positions, K and V stored in their
// cache slots; returns the rotated q. qk: [tokens, heads + kv_heads, dim] and v:
// [tokens, kv_heads, dim], both may be strided views of the fused projection.
template <typename T>
void rotary_store_rows(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos,
                       const at::Tensor& sin, const at::Tensor& positions,
                       const at::Tensor& slots, at::Tensor& k_cache, at::Tensor& v_cache,
                       int64_t heads, at::Tensor& q_out) {
  const int64_t tokens = qk.size(0), all_heads = qk.size(1), dim = qk.size(2);
  const int64_t kv_heads = all_heads - heads, half = dim / 2;
  const int64_t qk_tok = qk.stride(0), qk_head = qk.stride(1);
  const int64_t v_tok = v.stride(0), v_head = v.stride(1);
  const T* qkp = qk.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* cosp = cos.data_ptr<T>();
  const T* sinp = sin.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  T* qo = q_out.data_ptr<T>();
  const int64_t slot_stride = kv_heads * dim;
  at::parallel_for(0, tokens, grain_for(all_heads * dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cosp + pos[t] * dim;
      const T* s = sinp + pos[t] * dim;
      for (int64_t h = 0; h < all_heads; ++h) {
        const T* x = qkp + t * qk_tok + h * qk_head;
        T* dst = h < heads ? qo + (t * heads + h) * dim
                           : kc + slot[t] * slot_stride + (h - heads) * dim;
#if defined(__AVX512F__)
        if constexpr (!std::is_same_v<T, double>) {
          if (half % 16 == 0) {
            // Both halves at once: out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2, each product
            // rounded as torch rounds it.
            using namespace kvrelay_vec;
            for (int64_t d = 0; d < half; d += 16) {
              const __m512 x1 = load16(x + d), x2 = load16(x + d + half);
              const __m512 a1 = round16<T>(_mm512_mul_ps(x1, load16(c + d)));
              const __m512 minus_x2 = _mm512_castsi512_ps(
                  _mm512_xor_si512(_mm512_castps_si512(x2), _mm512_set1_epi32(INT32_MIN)));
              const __m512 b1 = round16<T>(_mm512_mul_ps(minus_x2, load16(s + d)));
              const __m512 a2 = round16<T>(_mm512_mul_ps(x2, load16(c + d + half)));
              const __m512 b2 = round16<T>(_mm512_mul_ps(x1, load16(s + d + half)));
              store16(dst + d, _mm512_add_ps(a1, b1));
              store16(dst + d + half, _mm512_add_ps(a2, b2));
            }
            continue;
          }
        }
#endif
        for (int64_t d = 0; d < dim; ++d) {
          const float rotated = d < half ? -static_cast<float>(x[d + half])
                                         : static_cast<float>(x[d - half]);
          // x * cos and rotate_half(x) * sin are each rounded before they are summed.
          const float a = static_cast<float>(round_to<T>(static_cast<float>(x[d]) *
                                                         static_cast<float>(c[d])));
          const float b = static_cast<float>(round_to<T>(static_cast<float>(round_to<T>(rotated)) *
                                                         static_cast<float>(s[d])));
          dst[d] = round_to<T>(a + b);
        }
      }
      for (int64_t h = 0; h < kv_heads; ++h) {
        const T* src = vp + t * v_tok + h * v_head;
        T* dst = vc + slot[t] * slot_stride + h * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = src[d];
      }
    }
  });
}

at::Tensor rotary_store(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& positions,
                        const at::Tensor& slots, at::Tensor k_cache, at::Tensor v_cache,
                        int64_t heads) {
  TORCH_CHECK(qk.dim() == 3 && qk.stride(2) == 1 && v.dim() == 3 && v.stride(2) == 1,
              "qk, v: [tokens, heads, dim] with dense rows");
  const int64_t kv_heads = qk.size(1) - heads, dim = qk.size(2);
  TORCH_CHECK(kv_heads > 0 && dim % 2 == 0 && v.size(1) == kv_heads && v.size(2) == dim,
              "qk holds heads + kv_heads rows, v kv_heads, of an even dim");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.size(-1) == dim &&
                  k_cache.size(-2) == kv_heads,
              "caches: contiguous [pages, page_size, kv_heads, dim]");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(-1) == dim,
              "cos/sin: contiguous [positions, dim]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong &&
                  positions.is_contiguous() && slots.is_contiguous() &&
                  positions.numel() == qk.size(0) && slots.numel() == qk.size(0),
              "positions, slots: contiguous int64 [tokens]");
  const auto dtype = qk.scalar_type();
  TORCH_CHECK(v.scalar_type() == dtype && cos.scalar_type() == dtype &&
                  sin.scalar_type() == dtype && k_cache.scalar_type() == dtype &&
                  v_cache.scalar_type() == dtype,
              "qk, v, cos, sin and the caches must share a dtype");
  auto q = at::empty({qk.size(0), heads, dim}, qk.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "rotary_store", [&] {
    rotary_store_rows<scalar_t>(qk, v, cos, sin, positions, slots, k_cache, v_cache, heads, q);
  });
  return q;
}

// silu(gate) * up over [rows, 2 * inter] (gate first), each rounded as torch stores it.
template <typename T>
void silu_mul_rows(const T* in, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, grain_for(2 * inter), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = in + r * 2 * inter;
      const T* up = gate + inter;
      T* o = out + r * inter;
      int64_t i = 0;
#if defined(__AVX512F__)
      using namespace kvrelay_vec;
      const __m512 one = _mm512_set1_ps(1.f);
      if constexpr (!std::is_same_v<T, double>) {
        for (; i + 16 <= inter; i += 16) {
          const __m512 g = load16(gate + i);
          const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
          const __m512 act = round16<T>(_mm512_div_ps(g, _mm512_add_ps(one, e)));
          store16(o + i, _mm512_mul_ps(act, load16(up + i)));
        }
      }
#endif
      for (; i < inter; ++i) {
        const float g = static_cast<float>(gate[i]);
        const float act = static_cast<float>(round_to<T>(g / (1.f + std::exp(-g))));
        o[i] = round_to<T>(act * static_cast<float>(up[i]));
      }
    }
  });
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up: [rows, 2 * inter]");
  const auto in = gate_up.contiguous();
  const int64_t inter = in.size(1) / 2;
  auto out = at::empty({in.size(0), inter}, in.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "silu_and_mul", [&] {
    silu_mul_rows<scalar_t>(in.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), in.size(0), inter);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvrelay, m) {
  m.def("add_rms_norm(Tensor(a!) residual, Tensor? x, Tensor weight, float eps) -> Tensor");
  m.def(
      "rotary_store(Tensor qk, Tensor v, Tensor cos, Tensor sin, Tensor positions, Tensor slots, "
      "Tensor(a!) k_cache, Tensor(b!) v_cache, int heads) -> Tensor");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvrelay, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary_store", &rotary_store);
  m.impl("silu_and_mul", &silu_and_mul);
}
