// Bit-packed binary kernels: sign packing, XNOR-popcount direct convolution with a fused epilogue,
// max pooling and channel permutation on packed bits, unpacking to ±1 floats.
//
// Layout of a packed activation: int64 words (N, H, W, CW), CW = ceil(C / 64); channel c is bit c % 64
// (LSB first) of word c / 64; bit 1 means +1, bit 0 means -1; unused high bits are 0.
//
// One build runs on every x86-64 CPU: the vector kernels carry function-level target attributes and are
// only called after __builtin_cpu_supports says the CPU has the instructions.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int kLanes = 8;  // output channels per weight block (one 512-bit vector of 64-bit words)

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vpopcnt = 3 };

bool isa_supported(int64_t isa) {
  __builtin_cpu_init();
  switch (isa) {
    case kScalar: return true;
    case kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    case kAvx512: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    case kAvx512Vpopcnt:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vpopcntdq");
    default: return false;
  }
}

// Items per thread chunk so each chunk carries about kMinChunkWork units of work (a unit ≈ one vector
// instruction): waking a second thread costs microseconds, more than a small layer at batch 1 computes.
constexpr int64_t kMinChunkWork = 1 << 14;
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinChunkWork / std::max<int64_t>(1, work_per_item));
}

// Portable popcount: no popcnt instruction assumed (the scalar path must run on any x86-64).
inline int popcount64(uint64_t v) {
  v = v - ((v >> 1) & 0x5555555555555555ULL);
  v = (v & 0x3333333333333333ULL) + ((v >> 2) & 0x3333333333333333ULL);
  v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
  return static_cast<int>((v * 0x0101010101010101ULL) >> 56);
}

// Everything one convolution call needs, resolved once.
struct ConvGeometry {
  int64_t N, H, W, CW;           // input
  int64_t OH, OW, CWo;           // output
  int64_t KH, KW, sh, sw, ph, pw, dh, dw;
  int64_t cout, cin_per_group, groups, cout_per_group, nwg, blocks;
  const uint64_t* x;
  bool paired;                   // two taps per weight word (see the tiled kernels)
  const uint64_t* weight;        // (blocks, KH*KW, nwg, kLanes), paired: (blocks, ceil(KH*KW / 2), 1, kLanes)
  const int64_t* word_start;     // (groups)
  const uint64_t* mask;          // (groups, nwg)
};

// Tap k's weight bits (word j, lane l of block blk) in the low bits of a word, paired or not.
inline uint64_t tap_weight_word(const ConvGeometry& g, int64_t blk, int64_t k, int64_t j, int l) {
  const int64_t taps = g.KH * g.KW;
  if (!g.paired) return g.weight[((blk * taps + k) * g.nwg + j) * kLanes + l];
  const uint64_t word = g.weight[(blk * ((taps + 1) / 2) + k / 2) * kLanes + l];
  return k % 2 ? word >> 32 : word & 0xFFFFFFFFULL;
}

// Valid taps of one output pixel: their index in the kernel and the input pixel's first word.
struct Taps {
  std::vector<int64_t> tap;
  std::vector<const uint64_t*> row;
};

inline void collect_taps(const ConvGeometry& g, int64_t n, int64_t oh, int64_t ow, Taps& taps) {
  taps.tap.clear();
  taps.row.clear();
  for (int64_t kh = 0; kh < g.KH; ++kh) {
    const int64_t ih = oh * g.sh - g.ph + kh * g.dh;
    if (ih < 0 || ih >= g.H) continue;  // zero padding: the tap contributes nothing (not ±1)
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      const int64_t iw = ow * g.sw - g.pw + kw * g.dw;
      if (iw < 0 || iw >= g.W) continue;
      taps.tap.push_back(kh * g.KW + kw);
      taps.row.push_back(g.x + ((n * g.H + ih) * g.W + iw) * g.CW);
    }
  }
}

// The masked input words of one group for every valid tap: xbuf[t * nwg + j].
inline void gather_words(const ConvGeometry& g, const Taps& taps, int64_t group, std::vector<uint64_t>& xbuf) {
  const int64_t start = g.word_start[group];
  const uint64_t* mask = g.mask + group * g.nwg;
  xbuf.resize(taps.row.size() * g.nwg);
  for (size_t t = 0; t < taps.row.size(); ++t)
    for (int64_t j = 0; j < g.nwg; ++j) xbuf[t * g.nwg + j] = taps.row[t][start + j] & mask[j];
}

// ---------------------------------------------------------------------------------- popcount blocks
// Each computes, for one output pixel and one block of kLanes output channels, the number of
// mismatching bits summed over every valid tap and word, into mismatches[kLanes].
__attribute__((always_inline)) inline void block_scalar(const ConvGeometry& g, const Taps& taps, const uint64_t* xbuf, int64_t block,
                         int64_t* mismatches) {
  for (int l = 0; l < kLanes; ++l) mismatches[l] = 0;
  for (size_t t = 0; t < taps.tap.size(); ++t) {
    const uint64_t* w = g.weight + ((block * g.KH * g.KW + taps.tap[t]) * g.nwg) * kLanes;
    for (int64_t j = 0; j < g.nwg; ++j) {
      const uint64_t xv = xbuf[t * g.nwg + j];
      for (int l = 0; l < kLanes; ++l) mismatches[l] += popcount64(xv ^ w[j * kLanes + l]);
    }
  }
}

// ---------------------------------------------------------------------------------- tiled kernels
// The fast path, taken when every block of kLanes output channels lies inside one group: one call counts
// the mismatches of P output pixels of a row against B blocks, so each weight vector loaded serves P
// pixels and each input word B blocks (a register tile). The input is zero-padded beforehand, so the
// loops have no bounds checks: a padded (zero) word against a weight counts popcount(weight) mismatches,
// which the epilogue takes back out (see Corrections).
//
// Paired taps: where a group has at most 32 input channels, half of each 64-bit word would be empty, so two
// consecutive taps share one word (the second in the high half) in the weight and, shifted there on the fly,
// in the input word the tile computes: half the weight memory and half the popcounts.
constexpr int kTilePixels = 4;

struct TilePlan {
  int64_t terms, nwg;         // weight words per block and output channel: terms × nwg
  const int64_t* lo_offset;   // words from a pixel's window corner to each term's (first) tap
  const int64_t* hi_offset;   // paired: the second tap (= lo for a lone last tap, masked off); unpaired: unused
  const uint64_t* term_mask;  // paired: each term's input mask; unpaired: nullptr (the group's masks)
  const uint64_t* weight;     // (blocks, terms, nwg, kLanes)
  int64_t block_stride;       // terms * nwg * kLanes
  int64_t mm_stride;          // int64 counters per pixel in the output buffer (blocks * kLanes)
};

// The input word of term k, word j for one pixel (window corner `px`).
template <bool Paired>
__attribute__((always_inline)) inline uint64_t term_word(const TilePlan& t, const uint64_t* px, const uint64_t* mask,
                                                         int64_t k, int64_t j) {
  if constexpr (Paired) return (px[t.lo_offset[k]] | (px[t.hi_offset[k]] << 32)) & t.term_mask[k];
  return px[t.lo_offset[k] + j] & mask[j];
}

// Where a bits-out tile writes: output bit o of pixel p is (mismatches_o ≤ limit[p][o]) XOR flip_o, one byte
// per block of kLanes channels (see the limits in conv).
struct TileBits {
  const int64_t* limit[kTilePixels];  // the pixel's per-channel limits (its padding class)
  uint8_t* bytes[kTilePixels];        // the pixel's output bytes
  const uint8_t* flip;                // per block
};

// px[p]: pixel p's window corner (group start included); mask: the group's word masks. With `bits`, the
// tile compares its counts with the limits and writes output bytes; without, the counts of block blk0 + b,
// lane l, pixel p go to mm[p * mm_stride + (blk0 + b) * kLanes + l] for the float epilogue.
using TileFn = void (*)(const TilePlan&, const uint64_t* const*, const uint64_t*, int64_t, int64_t*, const TileBits*);

// The output byte of one block from its counts in memory (the tiles whose counts end up there).
inline uint8_t bits_byte_scalar(const int64_t* counts, const int64_t* limit, uint8_t flip) {
  uint8_t byte = 0;
  for (int l = 0; l < kLanes; ++l) byte |= static_cast<uint8_t>(counts[l] <= limit[l]) << l;
  return byte ^ flip;
}

template <int P, int B, bool Paired>
__attribute__((target("avx512f,avx512bw,avx512vpopcntdq")))
void tile_avx512_vpopcnt(const TilePlan& t, const uint64_t* const* px, const uint64_t* mask, int64_t blk0,
                         int64_t* mm, const TileBits* bits) {
  __m512i acc[P][B];
#pragma GCC unroll 16
  for (int i = 0; i < P * B; ++i) acc[i / B][i % B] = _mm512_setzero_si512();
  const uint64_t* w0 = t.weight + blk0 * t.block_stride;
  for (int64_t k = 0; k < t.terms; ++k) {
    for (int64_t j = 0; j < t.nwg; ++j) {
      const uint64_t* w = w0 + (k * t.nwg + j) * kLanes;
      __m512i wv[B];
#pragma GCC unroll 4
      for (int b = 0; b < B; ++b) wv[b] = _mm512_loadu_si512(w + b * t.block_stride);
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) {
        const __m512i xv = _mm512_set1_epi64(static_cast<long long>(term_word<Paired>(t, px[p], mask, k, j)));
#pragma GCC unroll 4
        for (int b = 0; b < B; ++b) acc[p][b] = _mm512_add_epi64(acc[p][b], _mm512_popcnt_epi64(_mm512_xor_si512(xv, wv[b])));
      }
    }
  }
  if (bits) {  // the epilogue on the counts in registers
#pragma GCC unroll 16
    for (int i = 0; i < P * B; ++i) {
      const int p = i / B, blk = blk0 + i % B;
      const __mmask8 met = _mm512_cmple_epi64_mask(acc[p][i % B], _mm512_loadu_si512(bits->limit[p] + blk * kLanes));
      bits->bytes[p][blk] = static_cast<uint8_t>(met) ^ bits->flip[blk];
    }
    return;
  }
#pragma GCC unroll 16
  for (int i = 0; i < P * B; ++i)
    _mm512_storeu_si512(mm + (i / B) * t.mm_stride + (blk0 + i % B) * kLanes, acc[i / B][i % B]);
}

// Byte counters (a byte's popcount is ≤ 8, so 31 words fit) are summed into the int64 lanes by vpsadbw.
constexpr int kByteSteps = 31;

template <int N>
__attribute__((target("avx512f,avx512bw"), always_inline))
inline void flush_bytes_avx512(__m512i* bytes, int64_t* const* out) {
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) {
    _mm512_storeu_si512(out[i], _mm512_add_epi64(_mm512_loadu_si512(out[i]), _mm512_sad_epu8(bytes[i], _mm512_setzero_si512())));
    bytes[i] = _mm512_setzero_si512();
  }
}

template <int P, int B, bool Paired>
__attribute__((target("avx512f,avx512bw")))
void tile_avx512(const TilePlan& t, const uint64_t* const* px, const uint64_t* mask, int64_t blk0, int64_t* mm,
                 const TileBits* bits) {
  // No 64-bit popcount in AVX-512BW: nibble lookup (vpshufb) into byte counters.
  const __m512i lut = _mm512_set4_epi32(0x04030302, 0x03020201, 0x03020201, 0x02010100);
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i zero = _mm512_setzero_si512();
  // A short K (every layer of the demo NIN) never fills the byte counters: they stay in registers and
  // vpsadbw turns them into the counts once, at the end; a longer K flushes them into int64 counters in mm.
  const bool short_k = t.terms * t.nwg <= kByteSteps;
  __m512i bytes[P][B];
  int64_t* out[P][B];
#pragma GCC unroll 16
  for (int i = 0; i < P * B; ++i) {
    bytes[i / B][i % B] = zero;
    out[i / B][i % B] = mm + (i / B) * t.mm_stride + (blk0 + i % B) * kLanes;
    if (!short_k) _mm512_storeu_si512(out[i / B][i % B], zero);
  }
  const uint64_t* w0 = t.weight + blk0 * t.block_stride;
  int pending = 0;
  for (int64_t k = 0; k < t.terms; ++k) {
    for (int64_t j = 0; j < t.nwg; ++j) {
      const uint64_t* w = w0 + (k * t.nwg + j) * kLanes;
      __m512i wv[B];
#pragma GCC unroll 4
      for (int b = 0; b < B; ++b) wv[b] = _mm512_loadu_si512(w + b * t.block_stride);
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) {
        const __m512i xv = _mm512_set1_epi64(static_cast<long long>(term_word<Paired>(t, px[p], mask, k, j)));
#pragma GCC unroll 4
        for (int b = 0; b < B; ++b) {
          const __m512i v = _mm512_xor_si512(xv, wv[b]);
          const __m512i counts = _mm512_add_epi8(_mm512_shuffle_epi8(lut, _mm512_and_si512(v, low)),
                                                 _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), low)));
          bytes[p][b] = _mm512_add_epi8(bytes[p][b], counts);
        }
      }
      if (!short_k && ++pending == kByteSteps) {
        flush_bytes_avx512<P * B>(&bytes[0][0], &out[0][0]);
        pending = 0;
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < P * B; ++i) {
    const int p = i / B, blk = blk0 + i % B;
    __m512i counts = _mm512_sad_epu8(bytes[p][i % B], zero);
    if (!short_k) counts = _mm512_add_epi64(counts, _mm512_loadu_si512(out[p][i % B]));
    if (bits) {
      const __mmask8 met = _mm512_cmple_epi64_mask(counts, _mm512_loadu_si512(bits->limit[p] + blk * kLanes));
      bits->bytes[p][blk] = static_cast<uint8_t>(met) ^ bits->flip[blk];
    } else {
      _mm512_storeu_si512(out[p][i % B], counts);
    }
  }
}

__attribute__((target("avx2"), always_inline))
inline __m256i popcount_bytes_avx2(__m256i v) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(v, low);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

template <int P>
__attribute__((target("avx2"), always_inline))
inline void flush_bytes_avx2(__m256i* lo, __m256i* hi, int64_t* const* out) {
  const __m256i zero = _mm256_setzero_si256();
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p) {
    __m256i* o = reinterpret_cast<__m256i*>(out[p]);
    _mm256_storeu_si256(o, _mm256_add_epi64(_mm256_loadu_si256(o), _mm256_sad_epu8(lo[p], zero)));
    _mm256_storeu_si256(o + 1, _mm256_add_epi64(_mm256_loadu_si256(o + 1), _mm256_sad_epu8(hi[p], zero)));
    lo[p] = hi[p] = zero;
  }
}

// AVX2: one block is two 256-bit halves; 16 registers allow P pixels × one block.
template <int P, int B, bool Paired>
__attribute__((target("avx2")))
void tile_avx2(const TilePlan& t, const uint64_t* const* px, const uint64_t* mask, int64_t blk0, int64_t* mm,
               const TileBits* bits) {
  static_assert(B == 1, "the AVX2 tile holds one block");
  const __m256i zero = _mm256_setzero_si256();
  const bool short_k = t.terms * t.nwg <= kByteSteps;  // byte counters never flushed (as in tile_avx512)
  __m256i lo[P], hi[P];
  int64_t* out[P];
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p) {
    lo[p] = hi[p] = zero;
    out[p] = mm + p * t.mm_stride + blk0 * kLanes;
    if (short_k) continue;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[p]), zero);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[p] + 4), zero);
  }
  int pending = 0;
  const uint64_t* w0 = t.weight + blk0 * t.block_stride;
  for (int64_t k = 0; k < t.terms; ++k) {
    for (int64_t j = 0; j < t.nwg; ++j) {
      const uint64_t* w = w0 + (k * t.nwg + j) * kLanes;
      const __m256i w_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
      const __m256i w_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 4));
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) {
        const __m256i xv = _mm256_set1_epi64x(static_cast<long long>(term_word<Paired>(t, px[p], mask, k, j)));
        lo[p] = _mm256_add_epi8(lo[p], popcount_bytes_avx2(_mm256_xor_si256(xv, w_lo)));
        hi[p] = _mm256_add_epi8(hi[p], popcount_bytes_avx2(_mm256_xor_si256(xv, w_hi)));
      }
      if (!short_k && ++pending == kByteSteps) {
        flush_bytes_avx2<P>(lo, hi, out);
        pending = 0;
      }
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p) {
    __m256i counts[2] = {_mm256_sad_epu8(lo[p], zero), _mm256_sad_epu8(hi[p], zero)};
    __m256i* stored = reinterpret_cast<__m256i*>(out[p]);
    if (!short_k)
      for (int h = 0; h < 2; ++h) counts[h] = _mm256_add_epi64(counts[h], _mm256_loadu_si256(stored + h));
    if (!bits) {
      for (int h = 0; h < 2; ++h) _mm256_storeu_si256(stored + h, counts[h]);
      continue;
    }
    const int64_t* limit = bits->limit[p] + blk0 * kLanes;
    int byte = 0;
    for (int h = 0; h < 2; ++h) {  // count > limit: the bit is not set
      const __m256i above = _mm256_cmpgt_epi64(counts[h], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(limit + 4 * h)));
      byte |= (~_mm256_movemask_pd(_mm256_castsi256_pd(above)) & 0xF) << (4 * h);
    }
    bits->bytes[p][blk0] = static_cast<uint8_t>(byte) ^ bits->flip[blk0];
  }
}

template <int P, int B, bool Paired>
void tile_scalar(const TilePlan& t, const uint64_t* const* px, const uint64_t* mask, int64_t blk0, int64_t* mm,
                 const TileBits* bits) {
  static_assert(B == 1, "the scalar tile holds one block");
  int64_t acc[P][kLanes] = {};
  const uint64_t* w0 = t.weight + blk0 * t.block_stride;
  for (int64_t k = 0; k < t.terms; ++k) {
    for (int64_t j = 0; j < t.nwg; ++j) {
      const uint64_t* w = w0 + (k * t.nwg + j) * kLanes;
      for (int p = 0; p < P; ++p) {
        const uint64_t xv = term_word<Paired>(t, px[p], mask, k, j);
        for (int l = 0; l < kLanes; ++l) acc[p][l] += popcount64(xv ^ w[l]);
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    if (bits) {
      bits->bytes[p][blk0] = bits_byte_scalar(acc[p], bits->limit[p] + blk0 * kLanes, bits->flip[blk0]);
    } else {
      for (int l = 0; l < kLanes; ++l) mm[p * t.mm_stride + blk0 * kLanes + l] = acc[p][l];
    }
  }
}

// The widest block count first; a kernel family without a B-block variant lists nullptr.
struct TileFamily {
  TileFn pixels[2][2][3];  // [paired][P == kTilePixels][B = 4, 2, 1]
};

#define TILE_ROW_WIDE(KERNEL, P, PAIRED) {KERNEL<P, 4, PAIRED>, KERNEL<P, 2, PAIRED>, KERNEL<P, 1, PAIRED>}
#define TILE_ROW_NARROW(KERNEL, P, PAIRED) {nullptr, nullptr, KERNEL<P, 1, PAIRED>}
#define TILE_FAMILY(ROW, KERNEL)                                        \
  TileFamily{{{ROW(KERNEL, 1, false), ROW(KERNEL, kTilePixels, false)}, \
              {ROW(KERNEL, 1, true), ROW(KERNEL, kTilePixels, true)}}}

const TileFamily& tile_family(int64_t isa) {
  static const TileFamily vpopcnt = TILE_FAMILY(TILE_ROW_WIDE, tile_avx512_vpopcnt);
  static const TileFamily avx512 = TILE_FAMILY(TILE_ROW_WIDE, tile_avx512);
  static const TileFamily avx2 = TILE_FAMILY(TILE_ROW_NARROW, tile_avx2);
  static const TileFamily scalar = TILE_FAMILY(TILE_ROW_NARROW, tile_scalar);
  switch (isa) {
    case kAvx512Vpopcnt: return vpopcnt;
    case kAvx512: return avx512;
    case kAvx2: return avx2;
    default: return scalar;
  }
}

// The general path's epilogue (any grouping, one int32 dot product per channel).
void epilogue_dot_bits(const int32_t* dot, const int32_t* threshold, const uint8_t* flip, int64_t cwo,
                       uint64_t* out) {
  for (int64_t w = 0; w < cwo; ++w) {
    uint64_t word = 0;
    for (int b = 0; b < 64; ++b) {
      const int64_t o = w * 64 + b;
      word |= static_cast<uint64_t>((dot[o] >= threshold[o]) ^ flip[o]) << b;
    }
    out[w] = word;
  }
}

torch::Tensor check_words(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kInt64 && t.is_contiguous() && t.device().is_cpu(),
              what, " must be a contiguous CPU int64 tensor");
  return t;
}

}  // namespace

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  const char* labels[] = {"scalar", "avx2", "avx512", "avx512_vpopcnt"};
  for (int64_t isa = 0; isa < 4; ++isa)
    if (isa_supported(isa)) names.push_back(labels[isa]);
  return names;
}

torch::Tensor pack_sign(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32, "pack_sign needs a float32 NCHW tensor");
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), CW = (C + 63) / 64, HW = H * W;
  auto out = torch::zeros({N, H, W, CW}, torch::kInt64);
  const float* src = x.data_ptr<float>();
  uint64_t* dst = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  at::parallel_for(0, N * CW, grain_for(64 * HW), [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> words(HW);
    for (int64_t nw = begin; nw < end; ++nw) {
      const int64_t n = nw / CW, w = nw % CW;
      std::fill(words.begin(), words.end(), 0);
      for (int64_t c = w * 64; c < std::min(C, w * 64 + 64); ++c) {  // planes read contiguously, no branch
        const float* plane = src + (n * C + c) * HW;
        const int shift = static_cast<int>(c & 63);
        for (int64_t p = 0; p < HW; ++p) words[p] |= static_cast<uint64_t>(plane[p] >= 0.0f) << shift;  // sign(0) = +1, NaN -> -1
      }
      for (int64_t p = 0; p < HW; ++p) dst[(n * HW + p) * CW + w] = words[p];
    }
  });
  return out;
}

// Pixels [begin, end) of an (N, H, W, C) float tensor into sign words: 16 compares per instruction.
__attribute__((target("avx512f")))
void pack_sign_rows_avx512(const float* src, int64_t C, int64_t CW, int64_t begin, int64_t end, uint64_t* dst) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t p = begin; p < end; ++p) {
    const float* v = src + p * C;
    for (int64_t w = 0; w < CW; ++w) {
      uint64_t word = 0;
      const int64_t last = std::min<int64_t>(64, C - w * 64);
      for (int64_t b = 0; b < last; b += 16) {  // NaN compares false -> -1; lanes past C are masked off
        const __mmask16 lanes = last - b >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (last - b)) - 1);
        const __mmask16 ge = _mm512_mask_cmp_ps_mask(lanes, _mm512_maskz_loadu_ps(lanes, v + w * 64 + b), zero, _CMP_GE_OQ);
        word |= static_cast<uint64_t>(ge) << b;
      }
      dst[p * CW + w] = word;
    }
  }
}

// The same from a channels-last tensor viewed as (N, H, W, C) contiguous: one pixel's channels are adjacent.
torch::Tensor pack_sign_nhwc(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "pack_sign_nhwc needs a contiguous float32 NHWC tensor");
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), CW = (C + 63) / 64, P = N * H * W;
  auto out = torch::empty({N, H, W, CW}, torch::kInt64);
  const float* src = x.data_ptr<float>();
  uint64_t* dst = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  if (isa_supported(kAvx512)) {
    at::parallel_for(0, P, grain_for(C / 16 + 1), [&](int64_t begin, int64_t end) {
      pack_sign_rows_avx512(src, C, CW, begin, end, dst);
    });
    return out;
  }
  at::parallel_for(0, P, grain_for(C / 4 + 1), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* v = src + p * C;
      const __m128 zero = _mm_setzero_ps();
      for (int64_t w = 0; w < CW; ++w) {
        uint64_t word = 0;
        const int64_t last = std::min<int64_t>(64, C - w * 64);
        int64_t b = 0;
        for (; b + 4 <= last; b += 4)  // SSE2 (every x86-64): 4 signs per compare; NaN compares false -> -1
          word |= static_cast<uint64_t>(_mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(v + w * 64 + b), zero))) << b;
        for (; b < last; ++b) word |= static_cast<uint64_t>(v[w * 64 + b] >= 0.0f) << b;
        dst[p * CW + w] = word;
      }
    }
  });
  return out;
}

// Bits -> ±1 floats as (N, H, W, C) contiguous (the channels-last layout).
torch::Tensor unpack_nhwc(torch::Tensor bits, int64_t C) {
  check_words(bits, "packed bits");
  const int64_t N = bits.size(0), H = bits.size(1), W = bits.size(2), CW = bits.size(3), P = N * H * W;
  TORCH_CHECK(CW == (C + 63) / 64, "packed bits hold ", CW, " words per pixel, not the ", C, " channels given");
  auto out = torch::empty({N, H, W, C}, torch::kFloat32);
  const uint64_t* src = reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>());
  float* dst = out.data_ptr<float>();
  static const std::vector<float> table = [] {  // byte -> its 8 bits as ±1 floats
    std::vector<float> t(256 * 8);
    for (int byte = 0; byte < 256; ++byte)
      for (int b = 0; b < 8; ++b) t[byte * 8 + b] = ((byte >> b) & 1) ? 1.0f : -1.0f;
    return t;
  }();
  at::parallel_for(0, P, grain_for(C / 8 + 1), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(src + p * CW);  // little-endian: channel c in byte c/8
      float* d = dst + p * C;
      int64_t c = 0;
      for (; c + 8 <= C; c += 8) std::memcpy(d + c, table.data() + bytes[c >> 3] * 8, 8 * sizeof(float));
      for (; c < C; ++c) d[c] = ((src[p * CW + (c >> 6)] >> (c & 63)) & 1) ? 1.0f : -1.0f;
    }
  });
  return out;
}

torch::Tensor unpack(torch::Tensor bits, int64_t C) {
  check_words(bits, "packed bits");
  const int64_t N = bits.size(0), H = bits.size(1), W = bits.size(2), CW = bits.size(3), HW = H * W;
  TORCH_CHECK(CW == (C + 63) / 64, "packed bits hold ", CW, " words per pixel, not the ", C, " channels given");
  auto out = torch::empty({N, C, H, W}, torch::kFloat32);
  const uint64_t* src = reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>());
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, N * C, grain_for(HW), [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / C, c = nc % C;
      for (int64_t p = 0; p < HW; ++p)
        dst[nc * HW + p] = ((src[(n * HW + p) * CW + (c >> 6)] >> (c & 63)) & 1) ? 1.0f : -1.0f;
    }
  });
  return out;
}

// Max pooling of ±1 values is the OR of the bits over the window (padding, -inf, never wins): each window
// is clipped to the image once per output row and column, so the OR loops carry no bounds checks.
torch::Tensor max_pool(torch::Tensor bits, int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                       int64_t OH, int64_t OW) {
  check_words(bits, "packed bits");
  const int64_t N = bits.size(0), H = bits.size(1), W = bits.size(2), CW = bits.size(3);
  auto out = torch::empty({N, OH, OW, CW}, torch::kInt64);
  const uint64_t* src = reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>());
  uint64_t* dst = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  at::parallel_for(0, N * OH, grain_for(OW * KH * KW * CW), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / OH, oh = row % OH;
      const int64_t ih0 = std::max<int64_t>(oh * sh - ph, 0), ih1 = std::min(oh * sh - ph + KH, H);
      for (int64_t ow = 0; ow < OW; ++ow) {
        const int64_t iw0 = std::max<int64_t>(ow * sw - pw, 0), iw1 = std::min(ow * sw - pw + KW, W);
        uint64_t* o = dst + ((n * OH + oh) * OW + ow) * CW;
        for (int64_t w = 0; w < CW; ++w) {
          uint64_t word = 0;
          for (int64_t ih = ih0; ih < ih1; ++ih) {
            const uint64_t* s = src + ((n * H + ih) * W + iw0) * CW + w;
            for (int64_t iw = iw0; iw < iw1; ++iw, s += CW) word |= *s;
          }
          o[w] = word;
        }
      }
    }
  });
  return out;
}

// Output channel c takes input channel source[c] (a channel shuffle on packed bits).
torch::Tensor permute_channels(torch::Tensor bits, torch::Tensor source) {
  check_words(bits, "packed bits");
  check_words(source, "channel source");
  const int64_t N = bits.size(0), H = bits.size(1), W = bits.size(2), CW = bits.size(3), C = source.size(0);
  auto out = torch::zeros_like(bits);
  const uint64_t* src = reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>());
  const int64_t* from = source.data_ptr<int64_t>();
  uint64_t* dst = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  at::parallel_for(0, N * H * W, grain_for(C), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const uint64_t* s = src + p * CW;
      uint64_t* d = dst + p * CW;
      for (int64_t c = 0; c < C; ++c) d[c >> 6] |= ((s[from[c] >> 6] >> (from[c] & 63)) & 1) << (c & 63);
    }
  });
  return out;
}

namespace {

// Packed bits with `ph` zero rows and `pw` zero columns on each side.
torch::Tensor pad_bits(const torch::Tensor& bits, int64_t ph, int64_t pw) {
  const int64_t N = bits.size(0), H = bits.size(1), W = bits.size(2), CW = bits.size(3);
  auto out = torch::zeros({N, H + 2 * ph, W + 2 * pw, CW}, torch::kInt64);
  const int64_t* src = bits.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, N * H, grain_for(W * CW / 8 + 1), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / H, h = r % H;
      std::memcpy(dst + ((n * (H + 2 * ph) + h + ph) * (W + 2 * pw) + pw) * CW, src + r * W * CW,
                  W * CW * sizeof(int64_t));
    }
  });
  return out;
}

// Channels of several groups share a block (e.g. depthwise): one channel at a time, on the unpadded input.
void conv_mixed_groups(const ConvGeometry& g, const int32_t* thr, const uint8_t* flp, const float* a, const float* b,
                       uint64_t* out_bits, float* out_float) {
  const int64_t row_work = g.OW * g.cout * g.KH * g.KW * g.nwg / kLanes;
  at::parallel_for(0, g.N * g.OH, grain_for(row_work), [&](int64_t begin, int64_t end) {
    Taps taps;
    std::vector<uint64_t> xbuf;
    std::vector<int32_t> dot(g.CWo * 64, 0);
    alignas(64) int64_t mismatches[kLanes];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.OH, oh = row % g.OH;
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        collect_taps(g, n, oh, ow, taps);
        const int32_t valid = static_cast<int32_t>(taps.tap.size() * g.cin_per_group);
        int64_t gathered = -1;
        for (int64_t o = 0; o < g.cout; ++o) {
          const int64_t grp = o / g.cout_per_group;
          if (grp != gathered) { gather_words(g, taps, grp, xbuf); gathered = grp; }
          block_scalar(g, taps, xbuf.data(), o / kLanes, mismatches);
          dot[o] = valid - 2 * static_cast<int32_t>(mismatches[o % kLanes]);
        }
        if (out_bits) {
          epilogue_dot_bits(dot.data(), thr, flp, g.CWo, out_bits + ((n * g.OH + oh) * g.OW + ow) * g.CWo);
        } else {
          float* dst = out_float + ((n * g.OH + oh) * g.OW + ow) * g.cout;
          for (int64_t o = 0; o < g.cout; ++o) dst[o] = static_cast<float>(dot[o]) * a[o] + b[o];
        }
      }
    }
  });
}

}  // namespace

// Everything about one convolution that depends only on its weights, epilogue and input size (not on the
// input's values or batch): built once per input size by conv_plan and reused by every conv_run, so a
// small batch pays for its popcounts, not for rebuilding corrections and limits.
struct ConvPlan {
  ConvGeometry g{};              // N and the data pointers are set per call
  bool bits_out = false;
  bool mixed = false;            // blocks straddle groups: the per-channel path on the unpadded input
  int64_t Hp = 0, Wp = 0, terms = 0, lanes = 0, n_cols = 0;
  std::vector<int64_t> lo_offset, hi_offset;
  std::vector<uint64_t> term_mask;
  std::vector<uint8_t> flip_bytes;
  std::vector<int64_t> row_class, col_class;
  std::vector<int64_t> corrections, class_valid, limits;
  std::vector<char> class_full;
  // The layer's tensors the plan was derived from and reads at run time, with their version counters: an
  // in-place change of any of them makes the plan stale (current() says so; the caller rebuilds it).
  std::vector<torch::Tensor> tensors;  // weight, word_start, mask, threshold, flip, alpha, bias
  std::vector<int64_t> versions;

  // Inference tensors (made under torch.inference_mode) keep no version counter: recorded as -1, unchecked.
  static int64_t version_of(const torch::Tensor& t) { return t.is_inference() ? -1 : t._version(); }
  bool current() const {
    for (size_t i = 0; i < tensors.size(); ++i)
      if (version_of(tensors[i]) != versions[i]) return false;
    return true;
  }
};

namespace {

// Layouts of the weight, offsets, masks and epilogue tensors against the geometry.
void check_layer(const ConvGeometry& g, const torch::Tensor& weight, const torch::Tensor& word_start,
                 const torch::Tensor& mask, const torch::Tensor& threshold, const torch::Tensor& flip,
                 const torch::Tensor& alpha, const torch::Tensor& bias, bool bits_out) {
  check_words(weight, "packed weight");
  check_words(word_start, "group word offsets");
  check_words(mask, "group masks");
  TORCH_CHECK(weight.size(0) == g.blocks && mask.size(0) == g.groups && mask.size(1) == g.nwg &&
              weight.size(1) == (g.paired ? (g.KH * g.KW + 1) / 2 : g.KH * g.KW) && weight.size(2) == g.nwg &&
              weight.size(3) == kLanes, "packed weight layout does not match the geometry");
  TORCH_CHECK(word_start.size(0) == g.groups, "group word offsets do not match the groups");
  // Each epilogue reads only its own pair: thresholds and flips (bits out) or α and bias (float out).
  const int64_t padded = bits_out ? g.CWo * 64 : 0, channels = bits_out ? 0 : g.cout;
  TORCH_CHECK(threshold.scalar_type() == torch::kInt32 && threshold.numel() == padded, "threshold layout");
  TORCH_CHECK(flip.scalar_type() == torch::kUInt8 && flip.numel() == padded, "flip layout");
  TORCH_CHECK(alpha.scalar_type() == torch::kFloat32 && alpha.numel() == channels, "alpha layout");
  TORCH_CHECK(bias.scalar_type() == torch::kFloat32 && bias.numel() == channels, "bias layout");
}

}  // namespace

// The plan of one conv layer for inputs of H × W pixels and CW words.
std::shared_ptr<ConvPlan> conv_plan(torch::Tensor weight, torch::Tensor word_start, torch::Tensor mask,
                                    std::vector<int64_t> geometry, torch::Tensor threshold, torch::Tensor flip,
                                    torch::Tensor alpha, torch::Tensor bias, bool bits_out) {
  TORCH_CHECK(geometry.size() == 16, "conv geometry needs 16 integers");
  auto plan = std::make_shared<ConvPlan>();
  ConvGeometry& g = plan->g;
  g.H = geometry[0]; g.W = geometry[1]; g.CW = geometry[2];
  g.KH = geometry[3]; g.KW = geometry[4]; g.sh = geometry[5]; g.sw = geometry[6]; g.ph = geometry[7];
  g.pw = geometry[8]; g.dh = geometry[9]; g.dw = geometry[10]; g.cout = geometry[11]; g.cin_per_group = geometry[12];
  g.groups = geometry[13]; g.OH = geometry[14]; g.OW = geometry[15];
  TORCH_CHECK(g.groups > 0 && g.cout % g.groups == 0 && weight.dim() == 4 && mask.dim() == 2,
              "conv geometry does not match the packed weight");
  g.cout_per_group = g.cout / g.groups;
  g.nwg = mask.size(1);
  g.blocks = weight.size(0);
  g.CWo = (g.cout + 63) / 64;
  g.paired = weight.size(1) != g.KH * g.KW;
  check_layer(g, weight, word_start, mask, threshold, flip, alpha, bias, bits_out);
  TORCH_CHECK(!g.paired || (g.groups == 1 && g.nwg == 1 && g.cin_per_group <= 32),
              "paired-tap weights need one group of at most 32 input channels");
  TORCH_CHECK(g.blocks * kLanes >= g.cout, "packed weight does not cover the channels");
  TORCH_CHECK(g.OH > 0 && g.OW > 0 && (g.OH - 1) * g.sh + (g.KH - 1) * g.dh < g.H + 2 * g.ph &&
              (g.OW - 1) * g.sw + (g.KW - 1) * g.dw < g.W + 2 * g.pw, "conv output size does not fit the input");
  const int64_t* start = word_start.data_ptr<int64_t>();
  for (int64_t grp = 0; grp < g.groups; ++grp)
    TORCH_CHECK(start[grp] >= 0 && start[grp] + g.nwg <= g.CW, "group words outside the input");
  plan->bits_out = bits_out;
  plan->tensors = {weight, word_start, mask, threshold, flip, alpha, bias};
  for (const auto& t : plan->tensors) plan->versions.push_back(ConvPlan::version_of(t));
  plan->mixed = g.groups > 1 && g.cout_per_group % kLanes != 0;  // a block would straddle two groups
  if (plan->mixed) return plan;

  g.weight = reinterpret_cast<const uint64_t*>(weight.data_ptr<int64_t>());
  g.mask = reinterpret_cast<const uint64_t*>(mask.data_ptr<int64_t>());
  const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw, taps = g.KH * g.KW, lanes = g.blocks * kLanes;
  plan->Hp = Hp; plan->Wp = Wp; plan->lanes = lanes;
  std::vector<int64_t> tap_offset(taps);
  for (int64_t k = 0; k < taps; ++k) tap_offset[k] = ((k / g.KW) * g.dh * Wp + (k % g.KW) * g.dw) * g.CW;
  // Terms: one per tap, or per pair of taps 2t and 2t + 1 (the lone last tap pairs with itself, its high
  // half masked off).
  const int64_t terms = g.paired ? (taps + 1) / 2 : taps;
  plan->terms = terms;
  plan->lo_offset.resize(terms);
  plan->hi_offset.resize(terms);
  plan->term_mask.resize(g.paired ? terms : 0);
  for (int64_t k = 0; k < terms; ++k) {
    plan->lo_offset[k] = tap_offset[g.paired ? 2 * k : k];
    plan->hi_offset[k] = g.paired && 2 * k + 1 < taps ? tap_offset[2 * k + 1] : plan->lo_offset[k];
    if (g.paired) plan->term_mask[k] = g.mask[0] | (2 * k + 1 < taps ? g.mask[0] << 32 : 0);
  }
  const int32_t* thr = threshold.data_ptr<int32_t>();
  const uint8_t* flp = flip.data_ptr<uint8_t>();
  plan->flip_bytes.assign(g.blocks, 0);
  for (int64_t o = 0; bits_out && o < lanes; ++o)
    plan->flip_bytes[o / kLanes] |= static_cast<uint8_t>(flp[o] & 1) << (o % kLanes);
  // Mismatches a zero (padded) input word adds at tap k: the popcount of the weight's bits there.
  std::vector<int64_t> pad_mismatches(taps * lanes, 0);
  for (int64_t blk = 0; blk < g.blocks; ++blk)
    for (int64_t k = 0; k < taps; ++k)
      for (int64_t j = 0; j < g.nwg; ++j)
        for (int l = 0; l < kLanes; ++l)
          pad_mismatches[k * lanes + blk * kLanes + l] += popcount64(tap_weight_word(g, blk, k, j, l));
  // The taps inside the image form a rectangle [first, last] of kernel rows × columns; output rows (and
  // columns) with the same range share one class, and each (row class, column class) its correction.
  auto classes = [](int64_t count, int64_t stride, int64_t pad, int64_t size, int64_t kernel, int64_t dilation,
                    std::vector<int64_t>& class_of, std::vector<std::pair<int64_t, int64_t>>& ranges) {
    class_of.resize(count);
    for (int64_t o = 0; o < count; ++o) {
      int64_t first = 0, last = kernel - 1;
      while (first < kernel && o * stride + first * dilation < pad) ++first;
      while (last >= 0 && o * stride + last * dilation >= pad + size) --last;
      const std::pair<int64_t, int64_t> range{first, last};
      const auto found = std::find(ranges.begin(), ranges.end(), range);
      class_of[o] = found - ranges.begin();
      if (found == ranges.end()) ranges.push_back(range);
    }
  };
  std::vector<std::pair<int64_t, int64_t>> row_ranges, col_ranges;
  classes(g.OH, g.sh, g.ph, g.H, g.KH, g.dh, plan->row_class, row_ranges);
  classes(g.OW, g.sw, g.pw, g.W, g.KW, g.dw, plan->col_class, col_ranges);
  const int64_t n_cols = col_ranges.size(), n_classes = row_ranges.size() * n_cols;
  plan->n_cols = n_cols;
  plan->corrections.assign(n_classes * lanes, 0);
  plan->class_valid.assign(n_classes, 0);
  plan->class_full.assign(n_classes, 0);
  for (size_t rc = 0; rc < row_ranges.size(); ++rc)
    for (int64_t cc = 0; cc < n_cols; ++cc) {
      const int64_t id = rc * n_cols + cc;
      int64_t inside = 0;
      for (int64_t k = 0; k < taps; ++k) {
        const int64_t kh = k / g.KW, kw = k % g.KW;
        if (kh >= row_ranges[rc].first && kh <= row_ranges[rc].second && kw >= col_ranges[cc].first &&
            kw <= col_ranges[cc].second) {
          ++inside;
        } else {
          for (int64_t o = 0; o < lanes; ++o) plan->corrections[id * lanes + o] += pad_mismatches[k * lanes + o];
        }
      }
      plan->class_valid[id] = inside * g.cin_per_group;
      plan->class_full[id] = inside == taps;
    }

  // Bits out: bit o is (D_o ≥ T_o) XOR flip_o with D = valid − 2·(m − c), i.e. m ≤ c + floor((valid − T_o) / 2):
  // one limit per padding class and channel, which the tiles compare with their raw counts m in registers.
  if (bits_out) {
    plan->limits.resize(plan->corrections.size());
    for (int64_t id = 0; id < n_classes; ++id)
      for (int64_t o = 0; o < lanes; ++o) {
        const int64_t slack = plan->class_valid[id] - thr[o];
        plan->limits[id * lanes + o] =
            plan->corrections[id * lanes + o] + (slack >= 0 ? slack / 2 : -((1 - slack) / 2));
      }
  }
  g.weight = nullptr;  // the plan keeps numbers, never pointers into tensors it does not own
  g.mask = nullptr;
  return plan;
}

// Direct (im2col-free) binary convolution over packed channels, threads over output rows; `plan` comes
// from conv_plan for this layer and this input size, and holds the layer's tensors.
torch::Tensor conv_run(const ConvPlan& plan, torch::Tensor bits, int64_t isa) {
  check_words(bits, "packed bits");
  TORCH_CHECK(isa_supported(isa), "this CPU lacks the instructions of the requested kernel");
  TORCH_CHECK(plan.current(), "the conv plan is stale: a tensor it was built from changed in place");
  const bool bits_out = plan.bits_out;
  ConvGeometry g = plan.g;
  TORCH_CHECK(bits.size(1) == g.H && bits.size(2) == g.W && bits.size(3) == g.CW,
              "packed bits do not match the conv plan's input size");
  const torch::Tensor& weight = plan.tensors[0];
  g.N = bits.size(0);
  g.x = reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>());
  g.weight = reinterpret_cast<const uint64_t*>(weight.data_ptr<int64_t>());
  g.word_start = plan.tensors[1].data_ptr<int64_t>();
  g.mask = reinterpret_cast<const uint64_t*>(plan.tensors[2].data_ptr<int64_t>());
  const int32_t* thr = plan.tensors[3].data_ptr<int32_t>();
  const uint8_t* flp = plan.tensors[4].data_ptr<uint8_t>();
  const float* a = plan.tensors[5].data_ptr<float>();
  const float* b = plan.tensors[6].data_ptr<float>();

  // Bytes past the last block (channels never computed) must read 0.
  // Floats are written (N, OH, OW, cout): one contiguous run per pixel; returned as an NCHW view (channels-last).
  torch::Tensor out = !bits_out ? torch::empty({g.N, g.OH, g.OW, g.cout}, torch::kFloat32)
                      : g.blocks == g.CWo * 8 ? torch::empty({g.N, g.OH, g.OW, g.CWo}, torch::kInt64)
                                              : torch::zeros({g.N, g.OH, g.OW, g.CWo}, torch::kInt64);
  uint64_t* out_bits = bits_out ? reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>()) : nullptr;
  float* out_float = bits_out ? nullptr : out.data_ptr<float>();

  if (plan.mixed) {
    conv_mixed_groups(g, thr, flp, a, b, out_bits, out_float);
    return bits_out ? out : out.permute({0, 3, 1, 2});
  }

  // The tiled path on a zero-padded input.
  const torch::Tensor source = g.ph || g.pw ? pad_bits(bits, g.ph, g.pw) : bits;
  const uint64_t* x = reinterpret_cast<const uint64_t*>(source.data_ptr<int64_t>());
  const int64_t Hp = plan.Hp, Wp = plan.Wp, lanes = plan.lanes, n_cols = plan.n_cols;
  const TilePlan tile_plan{plan.terms, g.nwg, plan.lo_offset.data(), plan.hi_offset.data(),
                           g.paired ? plan.term_mask.data() : nullptr, g.weight, plan.terms * g.nwg * kLanes, lanes};
  const TileFamily& family = tile_family(isa);
  const int P = g.OW >= kTilePixels ? kTilePixels : 1;
  const TileFn* tiles = family.pixels[g.paired ? 1 : 0][P == kTilePixels ? 1 : 0];
  const int64_t group_blocks = g.groups == 1 ? g.blocks : g.cout_per_group / kLanes;

  const int64_t row_work = g.OW * g.groups * group_blocks * plan.terms * g.nwg;
  at::parallel_for(0, g.N * g.OH, grain_for(row_work), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> mm(kTilePixels * lanes);
    const uint64_t* px[kTilePixels];
    TileBits tile_bits{};
    tile_bits.flip = plan.flip_bytes.data();
    const TileBits* tile_out = bits_out ? &tile_bits : nullptr;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.OH, oh = row % g.OH, top = oh * g.sh;
      const int64_t row_id = plan.row_class[oh] * n_cols;
      for (int64_t ow0 = 0; ow0 < g.OW; ow0 += P) {
        const int64_t first = std::min(ow0, g.OW - P);  // the last tile overlaps the one before
        if (bits_out) {
          for (int p = 0; p < P; ++p) {
            tile_bits.limit[p] = plan.limits.data() + (row_id + plan.col_class[first + p]) * lanes;
            tile_bits.bytes[p] = reinterpret_cast<uint8_t*>(out_bits + ((n * g.OH + oh) * g.OW + first + p) * g.CWo);
          }
        }
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          for (int p = 0; p < P; ++p) px[p] = x + ((n * Hp + top) * Wp + (first + p) * g.sw) * g.CW + g.word_start[grp];
          const uint64_t* group_mask = g.mask + grp * g.nwg;
          for (int64_t blk = grp * group_blocks, last = blk + group_blocks; blk < last;) {
            const int64_t left = last - blk;
            const int width = left >= 4 && tiles[0] ? 0 : left >= 2 && tiles[1] ? 1 : 2;
            tiles[width](tile_plan, px, group_mask, blk, mm.data(), tile_out);
            blk += 4 >> width;
          }
        }
        if (bits_out) continue;
        for (int p = 0; p < P; ++p) {
          const int64_t ow = first + p, id = row_id + plan.col_class[ow];
          const int64_t valid = plan.class_valid[id];
          const int64_t* correction = plan.class_full[id] ? nullptr : plan.corrections.data() + id * lanes;
          const int64_t* counts = mm.data() + p * lanes;
          float* dst = out_float + ((n * g.OH + oh) * g.OW + ow) * g.cout;
          for (int64_t o = 0; o < g.cout; ++o) {
            const int64_t dot = valid - 2 * (counts[o] - (correction ? correction[o] : 0));
            const float product = static_cast<float>(dot) * a[o];  // exact: α on the float16 grid, |D| < 2^13
            dst[o] = product + b[o];
          }
        }
      }
    }
  });
  return bits_out ? out : out.permute({0, 3, 1, 2});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<ConvPlan, std::shared_ptr<ConvPlan>>(m, "ConvPlan")
      .def("current", &ConvPlan::current, "whether no tensor the plan was built from changed since");
  m.def("supported_isas", &supported_isas, "kernels this CPU can run, slowest first");
  m.def("pack_sign", &pack_sign, "float NCHW -> packed sign bits (N, H, W, ceil(C/64))");
  m.def("unpack", &unpack, "packed bits -> float ±1 NCHW");
  m.def("pack_sign_nhwc", &pack_sign_nhwc, "float NHWC -> packed sign bits");
  m.def("unpack_nhwc", &unpack_nhwc, "packed bits -> float ±1 NHWC");
  m.def("max_pool", &max_pool, "max pooling of ±1 values on packed bits (OR)");
  m.def("permute_channels", &permute_channels, "channel permutation on packed bits");
  m.def("conv_plan", &conv_plan, "a binary conv's per-input-size plan (corrections, limits, offsets)");
  m.def("conv_run", &conv_run, "binary XNOR-popcount convolution with a fused epilogue, on a plan");
}
