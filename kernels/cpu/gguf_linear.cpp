// Linear layers that read GGUF-quantised weights (Q4_0, Q4_1, Q8_0) instead of bfloat16.
//
// Decode-sized matmuls are bound by the bytes of weight they stream each step; a Q4_1 weight
// is 6 bits here where its bfloat16 copy is 16. Each 32-weight block is widened in registers
// to the exact bfloat16 values transformers gets (float32 de-quantisation, rounded to
// nearest even) and multiplied with AMX tiles, so results match a bfloat16 matmul over the
// de-quantised weights up to summation order. That order depends on nothing but K: a row's
// output is the same whatever the batch around it (oneDNN's is not).
//
// Weights are repacked once at load (gguf_pack) into panels of 32 output rows; a panel holds,
// per k block, the 32 rows' quants and then their scales (and minimums) as float32, so a
// matmul reads memory front to back and broadcasts each scale straight from memory.
// The tiles compute out^T: a widened block (32 k of one output row) is exactly one 64-byte
// row of an AMX "A" tile; the activations are laid out once per call as the "B" operand
// (pairs of k, VNNI) and each 16x16 result tile is transposed on its way out.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define KVRELAY_GGUF_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

// ggml's type numbers, as GGUF files and gguf-py name them.
constexpr int64_t kQ4_0 = 2;
constexpr int64_t kQ4_1 = 3;
constexpr int64_t kQ8_0 = 8;
constexpr int64_t kBlock = 32;  // weights per block, for all three
constexpr int64_t kPanel = 32;  // output rows per packed panel
constexpr int64_t kPrefetchBytes = 4096;  // how far ahead the decode path prefetches weights

struct BlockFormat {
  int64_t gguf_bytes;   // bytes of one block in the file
  int64_t quant_bytes;  // bytes of its quants
  bool has_min;         // Q4_1's per-block minimum
};

constexpr BlockFormat format_of(int64_t type) {
  switch (type) {
    case kQ4_0:
      return {18, 16, false};  // f16 scale, 32 nibbles (minus 8)
    case kQ4_1:
      return {20, 16, true};  // f16 scale, f16 minimum, 32 nibbles
    case kQ8_0:
      return {34, 32, false};  // f16 scale, 32 int8
    default:
      TORCH_CHECK(false, "GGUF block type ", type, " is not supported (Q4_0, Q4_1, Q8_0)");
  }
}

// Bytes of one block once packed: its quants, then float32 scale (and minimum).
constexpr int64_t packed_block_bytes(int64_t type) {
  const BlockFormat f = format_of(type);
  return f.quant_bytes + 4 + (f.has_min ? 4 : 0);
}

float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// One block as float32, computed as gguf-py does (every product here is exact in float32).
void dequantize_block(int64_t type, const uint8_t* b, float* y) {
  const float d = half_at(b);
  if (type == kQ8_0) {
    const auto* q = reinterpret_cast<const int8_t*>(b + 2);
    for (int j = 0; j < 32; ++j) y[j] = d * static_cast<float>(q[j]);
    return;
  }
  const bool q4_1 = type == kQ4_1;
  const float m = q4_1 ? half_at(b + 2) : 0.f;
  const uint8_t* qs = b + (q4_1 ? 4 : 2);
  for (int j = 0; j < 16; ++j) {
    const int lo = qs[j] & 0x0f, hi = qs[j] >> 4;
    y[j] = q4_1 ? d * static_cast<float>(lo) + m : d * static_cast<float>(lo - 8);
    y[j + 16] = q4_1 ? d * static_cast<float>(hi) + m : d * static_cast<float>(hi - 8);
  }
}

// Where block (row, kb) of a packed [n_total, k_blocks] matrix lives: the start of its
// group (panel, kb) and its row within the panel.
struct PackedGroup {
  const uint8_t* base;
  int64_t rows;
};

inline PackedGroup group_at(const uint8_t* packed, int64_t type, int64_t n_total,
                            int64_t k_blocks, int64_t panel, int64_t kb) {
  const int64_t bytes = packed_block_bytes(type);
  const int64_t rows = std::min(kPanel, n_total - panel * kPanel);
  return {packed + panel * kPanel * k_blocks * bytes + kb * rows * bytes, rows};
}

// The scale of row r of a group, its minimum, and its quants.
inline const float* group_scales(PackedGroup g, int64_t type) {
  return reinterpret_cast<const float*>(g.base + g.rows * format_of(type).quant_bytes);
}

at::Tensor pack(const at::Tensor& blocks, int64_t type, int64_t k) {
  const BlockFormat f = format_of(type);
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && blocks.is_contiguous(),
              "blocks: contiguous uint8 [out_features, bytes per row]");
  TORCH_CHECK(k % kBlock == 0, "in_features must be a multiple of ", kBlock);
  TORCH_CHECK(blocks.size(1) == k / kBlock * f.gguf_bytes, "blocks: ", blocks.size(1),
              " bytes per row do not hold ", k, " weights of type ", type);
  const int64_t n = blocks.size(0), k_blocks = k / kBlock, bytes = packed_block_bytes(type);
  at::Tensor out = at::empty({n * k_blocks * bytes}, at::kByte);
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t quant_offset = f.has_min ? 4 : 2;
  for (int64_t panel = 0; panel * kPanel < n; ++panel) {
    for (int64_t kb = 0; kb < k_blocks; ++kb) {
      const PackedGroup g = group_at(dst, type, n, k_blocks, panel, kb);
      auto* quants = const_cast<uint8_t*>(g.base);
      auto* scales = const_cast<float*>(group_scales(g, type));
      for (int64_t r = 0; r < g.rows; ++r) {
        const uint8_t* b = src + (panel * kPanel + r) * blocks.size(1) + kb * f.gguf_bytes;
        if (type == kQ8_0) {
          std::memcpy(quants + r * f.quant_bytes, b + quant_offset, f.quant_bytes);
        } else {
          // Weight j's nibble goes to 16-bit word j % 8, bits 4 * (j / 8): widen_row then
          // finds every weight's nibble with one broadcast and one shift per lane.
          const uint8_t* qs = b + quant_offset;
          uint16_t words[8] = {};
          for (int j = 0; j < 32; ++j) {
            const int q = j < 16 ? qs[j] & 0x0f : qs[j - 16] >> 4;
            words[j % 8] = static_cast<uint16_t>(words[j % 8] | q << (4 * (j / 8)));
          }
          std::memcpy(quants + r * f.quant_bytes, words, 16);
        }
        scales[r] = half_at(b);
        if (f.has_min) scales[g.rows + r] = half_at(b + 2);
      }
    }
  }
  return out;
}

#if defined(KVRELAY_GGUF_AMX)

// The 32 weights of row r of a group as bfloat16 bits at `out`: the values dequantize_block
// gives, rounded to nearest even (they are never float32-denormal, so the instruction's
// flush changes nothing).
template <int64_t Type>
inline void widen_row(PackedGroup g, int64_t r, uint16_t* out) {
  constexpr int64_t quant_bytes = format_of(Type).quant_bytes;
  const auto* scales = reinterpret_cast<const float*>(g.base + g.rows * quant_bytes);
  const __m512 d = _mm512_set1_ps(scales[r]);
  if constexpr (Type == kQ8_0) {
    __m512 lo, hi;
    const auto* q = reinterpret_cast<const __m128i*>(g.base + r * 32);
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))), d);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))), d);
    _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  } else {
    // The block's 16 values, rounded to bfloat16, in both halves of a 32-entry table; the
    // 16 quant bytes repeated in each 128-bit lane put weight j's nibble in word j % 8 of
    // lane j, so one variable shift brings it to the low bits the permute reads (bit 4 may
    // be set: it picks the table's second copy).
    __m512 values;
    if constexpr (Type == kQ4_1) {
      // d * q is exact, so the fused multiply-add rounds as gguf-py's d * q + m does.
      const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      values = _mm512_fmadd_ps(iota, d, _mm512_set1_ps(scales[g.rows + r]));
    } else {
      const __m512 iota = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
      values = _mm512_mul_ps(iota, d);
    }
    const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(values, values);
    const __m512i quants = _mm512_broadcast_i32x4(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(g.base + r * 16)));
    const __m512i shifts = _mm512_set_epi16(12, 12, 12, 12, 12, 12, 12, 12, 8, 8, 8, 8, 8, 8, 8,
                                            8, 4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm512_storeu_si512(out, _mm512_permutexvar_epi16(_mm512_srlv_epi16(quants, shifts), table));
  }
}

template <int64_t Type>
inline void widen_group(PackedGroup g, uint16_t* out) {
  for (int64_t r = 0; r < g.rows; ++r) widen_row<Type>(g, r, out + r * 32);
}

bool amx_permitted() {
  // Linux hands out the AMX tile state only to processes that ask (ARCH_REQ_XCOMP_PERM for
  // XFEATURE_XTILEDATA); asking twice is harmless.
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: results (n tile i, m tile j -> 2i + j), 4-5: weights, 6-7: activations; all
// 16 rows of 64 bytes.
void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
}

// results[2 * ni + mi] = weight tile ni x activation tile mi summed over all k blocks; the
// weight tiles come from `weights(kb)`, which may widen them there and then: it is called
// one k block ahead of the tiles reading them (a tile load waits for stores to its bytes
// to drain, so reading what was just written would stall). results: [4][16 n][16 m].
template <int NT, int MT, typename WeightsAt>
void multiply_panel(WeightsAt weights, const uint16_t* acts0, const uint16_t* acts1,
                    int64_t k_blocks, float* results) {
  _tile_zero(0);
  if constexpr (MT == 2) _tile_zero(1);
  if constexpr (NT == 2) _tile_zero(2);
  if constexpr (NT == 2 && MT == 2) _tile_zero(3);
  const uint16_t* next = weights(0);
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    const uint16_t* wk = next;
    if (kb + 1 < k_blocks) next = weights(kb + 1);
    _tile_loadd(4, wk, 64);
    _tile_loadd(6, acts0 + kb * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (MT == 2) {
      _tile_loadd(7, acts1 + kb * 512, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (NT == 2) {
      _tile_loadd(5, wk + 512, 64);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (MT == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, results, 64);
  if constexpr (MT == 2) _tile_stored(1, results + 256, 64);
  if constexpr (NT == 2) _tile_stored(2, results + 512, 64);
  if constexpr (NT == 2 && MT == 2) _tile_stored(3, results + 768, 64);
}

template <typename WeightsAt>
void multiply_panel_any(int n_tiles, bool two_m, WeightsAt weights, const uint16_t* a0,
                        const uint16_t* a1, int64_t k_blocks, float* results) {
  if (n_tiles == 2 && two_m) multiply_panel<2, 2>(weights, a0, a1, k_blocks, results);
  if (n_tiles == 2 && !two_m) multiply_panel<2, 1>(weights, a0, a1, k_blocks, results);
  if (n_tiles == 1 && two_m) multiply_panel<1, 2>(weights, a0, a1, k_blocks, results);
  if (n_tiles == 1 && !two_m) multiply_panel<1, 1>(weights, a0, a1, k_blocks, results);
}

// Rows of r become its columns (16x16 float32).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m512 u[16];  // u[4g + j], lane L: column 4L + j of rows 4g .. 4g + 3
  for (int g = 0; g < 4; ++g) {
    u[4 * g] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xee);
    u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xee);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 x0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88);
    const __m512 x1 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xdd);
    const __m512 y0 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
    const __m512 y1 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xdd);
    r[j] = _mm512_shuffle_f32x4(x0, y0, 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(x0, y0, 0xdd);
    r[4 + j] = _mm512_shuffle_f32x4(x1, y1, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(x1, y1, 0xdd);
  }
}

// One [16 n][16 m] result tile into out rows m0.. (at most `rows` of them), columns n0..n0+15.
void write_tile(const float* tile, const float* bias, int64_t m0, int64_t rows, int64_t n0,
                int64_t n_total, at::BFloat16* out) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(tile + 16 * i);
  transpose16(r);
  const __m512 b = bias != nullptr ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();
  for (int64_t c = 0; c < rows; ++c) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_add_ps(r[c], b));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (m0 + c) * n_total + n0), (__m256i)v);
  }
}

// The result tiles of one panel (n_tiles x m_count, starting at activation tile mt).
void write_results(const float* results, int n_tiles, int m_count, int64_t mt, int64_t m_total,
                   int64_t n0, int64_t n_total, const float* bias, at::BFloat16* out) {
  for (int ni = 0; ni < n_tiles; ++ni) {
    for (int mi = 0; mi < m_count; ++mi) {
      const int64_t m0 = (mt + mi) * 16;
      write_tile(results + (2 * ni + mi) * 256, bias, m0, std::min<int64_t>(16, m_total - m0),
                 n0 + 16 * ni, n_total, out);
    }
  }
}

// Tile loads of rows that straddle cache lines, or of lines just written by vector stores
// outside L1, run at a fraction of AMX's rate: every buffer a tile reads is 64-byte aligned
// and the widened weights rotate through three L1-resident 2 KiB slots. Not zeroed: what a
// tile reads is written first.
template <typename T>
struct AlignedBuffer {
  explicit AlignedBuffer(size_t count)
      : data(static_cast<T*>(std::aligned_alloc(64, (count * sizeof(T) + 63) / 64 * 64))) {
    TORCH_CHECK(data != nullptr, "out of memory for a ", count * sizeof(T), "-byte buffer");
  }
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  T* data;
};

// Activations as AMX B tiles: [m_tiles][k_blocks][16 pairs of k][16 rows m][2] bf16, rows
// past m_total zero.
void activation_tiles(const at::Tensor& x, uint32_t* acts) {
  const int64_t m_total = x.size(0), k = x.size(1), k_blocks = k / kBlock;
  const auto* xs = reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>());
  if (m_total % 16 != 0)  // the last tile's padding rows
    std::memset(acts + (m_total / 16) * k_blocks * 256, 0, k_blocks * 256 * sizeof(uint32_t));
  at::parallel_for(0, m_total, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      uint32_t* base = acts + (m / 16) * k_blocks * 256 + (m % 16);
      const uint32_t* row = xs + m * (k / 2);
      for (int64_t kp = 0; kp < k / 2; ++kp) base[(kp / 16) * 256 + (kp % 16) * 16] = row[kp];
    }
  });
}

template <int64_t Type>
at::Tensor gguf_linear_amx(const at::Tensor& x, const at::Tensor& packed, int64_t n_total,
                           const at::Tensor& bias) {
  const int64_t m_total = x.size(0), k_blocks = x.size(1) / kBlock;
  const int64_t m_tiles = (m_total + 15) / 16;
  const AlignedBuffer<uint32_t> acts(static_cast<size_t>(m_tiles * k_blocks * 256));
  activation_tiles(x, acts.data);
  at::Tensor out = at::empty({m_total, n_total}, x.options());
  auto* o = out.data_ptr<at::BFloat16>();
  const uint8_t* w = packed.data_ptr<uint8_t>();
  at::Tensor bias_f = bias.defined() ? bias.to(at::kFloat).contiguous() : at::Tensor();
  const float* bf = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const auto* a16 = reinterpret_cast<const uint16_t*>(acts.data);
  const int64_t panels = (n_total + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();  // per thread, and again per call: oneDNN may have loaded its own
    const AlignedBuffer<uint16_t> widened(
        static_cast<size_t>((m_tiles <= 2 ? 3 : k_blocks) * kPanel * kBlock));
    alignas(64) float results[1024];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kPanel;
      const int n_tiles = n_total - n0 >= 32 ? 2 : 1;
      auto group = [&](int64_t kb) { return group_at(w, Type, n_total, k_blocks, p, kb); };
      if (m_tiles <= 2) {
        // Decode: each k block's weights are widened just before their tiles use them, in
        // three rotating L1 buffers.
        const bool two_m = m_tiles == 2;
        multiply_panel_any(
            n_tiles, two_m,
            [&](int64_t kb) {
              uint16_t* buf = widened.data + (kb % 3) * 1024;
              const PackedGroup g = group(kb);
              // The weights a few groups on (past the end of the matrix a prefetch is a
              // no-op): the stream is sequential, but the hardware prefetcher alone leaves
              // widening waiting on memory (prefetched: ~20% faster decode matmuls).
              const uint8_t* ahead = g.base + kPrefetchBytes;
              for (int64_t off = 0; off < g.rows * packed_block_bytes(Type); off += 64)
                _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
              widen_group<Type>(g, buf);
              return static_cast<const uint16_t*>(buf);
            },
            a16, a16 + k_blocks * 512, k_blocks, results);
        write_results(results, n_tiles, two_m ? 2 : 1, 0, m_total, n0, n_total, bf, o);
        continue;
      }
      // Larger batches: the whole panel widened once, then every pair of activation tiles.
      for (int64_t kb = 0; kb < k_blocks; ++kb)
        widen_group<Type>(group(kb), widened.data + kb * 1024);
      for (int64_t mt = 0; mt < m_tiles; mt += 2) {
        const bool two_m = mt + 1 < m_tiles;
        const uint16_t* a0 = a16 + mt * k_blocks * 512;
        multiply_panel_any(
            n_tiles, two_m, [&](int64_t kb) { return widened.data + kb * 1024; }, a0,
            a0 + k_blocks * 512, k_blocks, results);
        write_results(results, n_tiles, two_m ? 2 : 1, mt, m_total, n0, n_total, bf, o);
      }
    }
    _tile_release();
  });
  return out;
}

#endif  // KVRELAY_GGUF_AMX

void check_packed(const at::Tensor& packed, int64_t type, int64_t n, int64_t k) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 1 && packed.is_contiguous(),
              "packed: the uint8 tensor gguf_pack returns");
  TORCH_CHECK(k % kBlock == 0, "in_features must be a multiple of ", kBlock);
  TORCH_CHECK(packed.numel() == n * (k / kBlock) * packed_block_bytes(type),
              "packed weights do not hold [", n, ", ", k, "] of type ", type);
}

bool gguf_linear_supported() {
#if defined(KVRELAY_GGUF_AMX)
  return amx_permitted();
#else
  return false;
#endif
}

// GGUF blocks [out_features, bytes per row] as float32 [out_features, in_features], exactly
// as gguf-py de-quantises.
at::Tensor gguf_dequantize(const at::Tensor& blocks, int64_t type, int64_t in_features) {
  const BlockFormat f = format_of(type);
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && blocks.is_contiguous(),
              "blocks: contiguous uint8 [out_features, bytes per row]");
  TORCH_CHECK(in_features % kBlock == 0 && blocks.size(1) == in_features / kBlock * f.gguf_bytes,
              "blocks do not hold rows of ", in_features, " weights of type ", type);
  const int64_t n = blocks.size(0), k_blocks = in_features / kBlock;
  at::Tensor out = at::empty({n, in_features}, at::kFloat);
  float* o = out.data_ptr<float>();
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t kb = 0; kb < k_blocks; ++kb)
        dequantize_block(type, w + r * blocks.size(1) + kb * f.gguf_bytes,
                         o + r * in_features + kb * kBlock);
  });
  return out;
}

// The bfloat16 weights gguf_linear multiplies with, widened by its own code: for tests.
at::Tensor gguf_widen(const at::Tensor& packed, int64_t type, int64_t n, int64_t k) {
  check_packed(packed, type, n, k);
  TORCH_CHECK(gguf_linear_supported(), "gguf_widen needs a CPU with AMX (bf16)");
  at::Tensor out = at::empty({n, k}, at::kBFloat16);
#if defined(KVRELAY_GGUF_AMX)
  auto* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  std::vector<uint16_t> buf(kPanel * kBlock);
  for (int64_t p = 0; p * kPanel < n; ++p) {
    for (int64_t kb = 0; kb < k / kBlock; ++kb) {
      const PackedGroup g = group_at(w, type, n, k / kBlock, p, kb);
      if (type == kQ4_0) widen_group<kQ4_0>(g, buf.data());
      if (type == kQ4_1) widen_group<kQ4_1>(g, buf.data());
      if (type == kQ8_0) widen_group<kQ8_0>(g, buf.data());
      for (int64_t r = 0; r < g.rows; ++r)
        std::memcpy(o + (p * kPanel + r) * k + kb * kBlock, buf.data() + r * kBlock, 64);
    }
  }
#endif
  return out;
}

at::Tensor gguf_pack(const at::Tensor& blocks, int64_t type, int64_t in_features) {
  return pack(blocks, type, in_features);
}

// x [rows, in_features] bfloat16 times the packed weight's transpose (+ bias):
// [rows, out_features] bfloat16. Needs gguf_linear_supported().
at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& packed, int64_t type,
                       int64_t out_features, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(gguf_linear_supported(), "gguf_linear needs a CPU with AMX (bf16)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "x: bfloat16 [rows, in_features]");
  check_packed(packed, type, out_features, x.size(1));
  TORCH_CHECK(out_features % 16 == 0, "out_features must be a multiple of 16");
  at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  TORCH_CHECK(!b.defined() || (b.dim() == 1 && b.size(0) == out_features), "bias: [out_features]");
#if defined(KVRELAY_GGUF_AMX)
  const at::Tensor xc = x.contiguous();
  if (type == kQ4_0) return gguf_linear_amx<kQ4_0>(xc, packed, out_features, b);
  if (type == kQ4_1) return gguf_linear_amx<kQ4_1>(xc, packed, out_features, b);
  return gguf_linear_amx<kQ8_0>(xc, packed, out_features, b);
#else
  return at::Tensor();
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvrelay, m) {
  m.def("gguf_linear_supported() -> bool", &gguf_linear_supported);
  m.def("gguf_dequantize(Tensor blocks, int type, int in_features) -> Tensor", &gguf_dequantize);
  m.def("gguf_pack(Tensor blocks, int type, int in_features) -> Tensor", &gguf_pack);
  m.def("gguf_widen(Tensor packed, int type, int out_features, int in_features) -> Tensor",
        &gguf_widen);
  m.def("gguf_linear(Tensor x, Tensor packed, int type, int out_features, Tensor? bias) -> Tensor",
        &gguf_linear);
}
