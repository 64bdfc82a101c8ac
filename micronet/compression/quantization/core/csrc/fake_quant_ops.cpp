// One-pass forward (and, where torch's own is not one vectorised pass, backward) kernels of the fake-quant
// activations: the sign with its hardtanh straight-through mask, DoReFa's clamp-round with its clip mask, and
// the per-tensor affine quantize-dequantize with its clip-STE mask. Each performs torch's float operations in
// torch's order, so values and gradients are bit-identical to the torch chains in micronet. Elements are
// visited in storage order: any dense layout (NCHW or channels-last) works, the Python side checks that
// tensors read together share their layout.
//
// The loops are plain, branch-free C++ that GCC vectorises; on x86-64 each is compiled for AVX-512 (x86-64-v4:
// F, BW, DQ, VL; byte masks need BW to stay in 512-bit registers), AVX2 and the baseline, and the loader picks
// the widest this CPU runs (target_clones), so one build serves every CPU.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MICRONET_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define MICRONET_VECTOR_CLONES
#endif

namespace {

constexpr int64_t kGrain = 1 << 14;

// nearbyint (half to even) without a libm call, so that the loops vectorise: below 2^23, adding and
// subtracting 2^23 rounds the fraction away in the (to-nearest-even) rounding mode; from 2^23 on every float
// is an integer already. copysign keeps -0.0 and NaN passes through.
inline float round_half_even(float v) {
  const float a = std::fabs(v);
  const float r = a < 8388608.0f ? (a + 8388608.0f) - 8388608.0f : a;
  return std::copysign(r, v);
}

// floor of a non-negative (or NaN) float, from the rounding above.
inline float floor_nonnegative(float w) {
  const float r = round_half_even(w);
  return r > w ? r - 1.0f : r;
}

// torch.clamp(v, lo, hi): NaN stays NaN (both comparisons are false).
inline float clamp(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// ------------------------------------------------------------------------------------------- loops
MICRONET_VECTOR_CLONES
void sign_loop(const float* src, float* dst, uint8_t* mask, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = src[i] >= 0.0f ? 1.0f : -1.0f;  // sign(0) = +1, NaN -> -1
    mask[i] = static_cast<uint8_t>((src[i] > -1.0f) & (src[i] < 1.0f));
  }
}

MICRONET_VECTOR_CLONES
void clamp_round_loop(const float* src, float* dst, uint8_t* mask, int64_t n, float p, float levels, bool half_away) {
  if (half_away) {  // sign(v)·floor(|v| + 0.5) = floor(v + 0.5) for v >= 0 or NaN
    for (int64_t i = 0; i < n; ++i) {
      const float scaled = src[i] * p;
      mask[i] = static_cast<uint8_t>((scaled >= 0.0f) & (scaled <= 1.0f));  // clamp(x·p, 0, 1) == x·p
      dst[i] = floor_nonnegative(clamp(scaled, 0.0f, 1.0f) * levels + 0.5f) / levels;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float scaled = src[i] * p;
      mask[i] = static_cast<uint8_t>((scaled >= 0.0f) & (scaled <= 1.0f));
      dst[i] = round_half_even(clamp(scaled, 0.0f, 1.0f) * levels) / levels;
    }
  }
}

MICRONET_VECTOR_CLONES
void clamp_round_backward_loop(const float* g, const uint8_t* mask, float* dst, int64_t n, float p, float levels) {
  for (int64_t i = 0; i < n; ++i) dst[i] = (mask[i] ? (g[i] / levels) * levels : 0.0f) * p;
}

MICRONET_VECTOR_CLONES
void affine_loop(const float* src, float* dst, uint8_t* mask, int64_t n, float inv, float s, float z, float lo,
                 float hi) {
  if (mask == nullptr) {
    for (int64_t i = 0; i < n; ++i) dst[i] = (clamp(round_half_even(src[i] * inv) + z, lo, hi) - z) * s;
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float q = round_half_even(src[i] * inv) + z;
    dst[i] = (clamp(q, lo, hi) - z) * s;
    mask[i] = static_cast<uint8_t>((q >= lo) & (q <= hi));
  }
}

// Extremes of a chunk, and whether every element is finite (x − x is 0 exactly for finite x). A simd
// reduction (-fopenmp-simd) may take the elements in any order: min and max of finite floats do not depend
// on it, and callers use the extremes only when every element is finite.
MICRONET_VECTOR_CLONES
void min_max_loop(const float* src, int64_t n, float* lo_out, float* hi_out, bool* finite_out) {
  float lo = src[0], hi = src[0];
  int32_t finite = 1;
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(& : finite)
  for (int64_t i = 0; i < n; ++i) {
    const float v = src[i];
    lo = std::min(lo, v);
    hi = std::max(hi, v);
    finite &= static_cast<int32_t>(v - v == 0.0f);
  }
  *lo_out = lo;
  *hi_out = hi;
  *finite_out = finite != 0;
}

MICRONET_VECTOR_CLONES
void masked_product_loop(const float* g, const uint8_t* mask, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = g[i] * static_cast<float>(mask[i]);  // 0·inf, 0·NaN: NaN, as torch
}

// ------------------------------------------------------------------------------------------- ops
void check_dense_float(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, what, " must be a float32 CPU tensor");
  TORCH_CHECK(t.is_non_overlapping_and_dense(), what, " must be dense");
}

void check_mask(const torch::Tensor& mask, const torch::Tensor& grad) {
  TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.strides() == grad.strides() && mask.sizes() == grad.sizes(),
              "mask and gradient must share shape and layout");
}

torch::Tensor bool_like(const torch::Tensor& x) { return torch::empty_like(x, x.options().dtype(torch::kBool)); }
uint8_t* bytes(torch::Tensor& mask) { return reinterpret_cast<uint8_t*>(mask.data_ptr<bool>()); }
const uint8_t* bytes(const torch::Tensor& mask) { return reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()); }

// sign(x) and the hardtanh straight-through mask |x| < 1 (torch: abs, lt, ge, where and three temporaries).
std::vector<torch::Tensor> sign_forward(torch::Tensor x) {
  check_dense_float(x, "x");
  auto out = torch::empty_like(x);
  auto inside = bool_like(x);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  uint8_t* mask = bytes(inside);
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    sign_loop(src + begin, dst + begin, mask + begin, end - begin);
  });
  return {out, inside};
}

// DoReFa's activation round(clamp(x·p, 0, 1)·n) / n and the mask of the clamp's linear range.
std::vector<torch::Tensor> clamp_round_forward(torch::Tensor x, double pre_scale, int64_t levels, bool half_away) {
  check_dense_float(x, "x");
  auto out = torch::empty_like(x);
  auto inside = bool_like(x);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  uint8_t* mask = bytes(inside);
  const float p = static_cast<float>(pre_scale), n = static_cast<float>(levels);
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    clamp_round_loop(src + begin, dst + begin, mask + begin, end - begin, p, n, half_away);
  });
  return {out, inside};
}

// Its gradient: ((g / n) · n where the mask is set, else 0) · p, as torch's chain computes it.
torch::Tensor clamp_round_backward(torch::Tensor grad, torch::Tensor inside, double pre_scale, int64_t levels) {
  check_dense_float(grad, "grad");
  check_mask(inside, grad);
  auto out = torch::empty_like(grad);
  const float* g = grad.data_ptr<float>();
  const uint8_t* mask = bytes(inside);
  float* dst = out.data_ptr<float>();
  const float p = static_cast<float>(pre_scale), n = static_cast<float>(levels);
  at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
    clamp_round_backward_loop(g + begin, mask + begin, dst + begin, end - begin, p, n);
  });
  return out;
}

// Per-tensor affine quantize-dequantize, (clamp(round(x · inv_scale) + z, lo, hi) − z) · scale, and the
// clip-STE mask lo ≤ round(x · inv_scale) + z ≤ hi.
std::vector<torch::Tensor> affine_forward(torch::Tensor x, double inv_scale, double scale, double zero_point,
                                          double quant_min, double quant_max, bool with_mask) {
  check_dense_float(x, "x");
  auto out = torch::empty_like(x);
  auto inside = with_mask ? bool_like(x) : torch::Tensor();
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  uint8_t* mask = with_mask ? bytes(inside) : nullptr;
  const float inv = static_cast<float>(inv_scale), s = static_cast<float>(scale), z = static_cast<float>(zero_point);
  const float lo = static_cast<float>(quant_min), hi = static_cast<float>(quant_max);
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    affine_loop(src + begin, dst + begin, mask ? mask + begin : nullptr, end - begin, inv, s, z, lo, hi);
  });
  return {out, inside};
}

// (min, max, all finite) of a dense float32 tensor with at least one element, one read. The extremes are
// meaningful only when every element is finite (callers check the flag first).
std::tuple<double, double, bool> min_max(torch::Tensor x) {
  check_dense_float(x, "x");
  TORCH_CHECK(x.numel() > 0, "min_max of an empty tensor");
  const float* src = x.data_ptr<float>();
  const int64_t chunks = (x.numel() + kGrain - 1) / kGrain;
  std::vector<float> lows(chunks), highs(chunks);
  std::vector<char> finite(chunks, 1);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t start = c * kGrain, count = std::min(kGrain, x.numel() - start);
      bool ok = true;
      min_max_loop(src + start, count, &lows[c], &highs[c], &ok);
      finite[c] = ok;
    }
  });
  float lo = lows[0], hi = highs[0];
  bool all_finite = true;
  for (int64_t c = 0; c < chunks; ++c) {
    lo = std::min(lo, lows[c]);
    hi = std::max(hi, highs[c]);
    all_finite = all_finite && finite[c];
  }
  return {lo, hi, all_finite};
}

// Per-channel (axis 0) affine weight quantization in one call: the extremes of each channel of `w` (merged
// into the running ones `prev_lo` / `prev_hi` when given), the signedness (`signed_policy` -1: signed when
// any extreme is negative), each channel's scale and zero point exactly as affine_qparams computes them in
// float32, and the quantize-dequantize with its clip mask. Returns {out, mask, lo, hi, scale, zero_point,
// signed}; {} (nothing computed) when `w` holds a NaN or an infinity.
std::vector<torch::Tensor> channel_affine_forward(torch::Tensor w, torch::Tensor prev_lo, torch::Tensor prev_hi,
                                                  std::vector<int64_t> signed_range, std::vector<int64_t> unsigned_range,
                                                  int64_t signed_policy, bool symmetric, double eps, bool with_mask) {
  check_dense_float(w, "w");
  TORCH_CHECK(w.is_contiguous() && w.dim() >= 1 && w.size(0) > 0 && w.numel() > 0, "w must be contiguous, channels first");
  TORCH_CHECK(signed_range.size() == 2 && unsigned_range.size() == 2, "code ranges are (min, max) pairs");
  const int64_t C = w.size(0), K = w.numel() / C;
  const bool running = prev_lo.defined() && prev_lo.numel() > 0;
  if (running) {
    check_dense_float(prev_lo, "prev_lo");
    check_dense_float(prev_hi, "prev_hi");
    TORCH_CHECK(prev_lo.numel() == C && prev_hi.numel() == C, "running extremes need one value per channel");
  }
  auto lo = torch::empty({C}, w.options()), hi = torch::empty({C}, w.options());
  float* lo_p = lo.data_ptr<float>();
  float* hi_p = hi.data_ptr<float>();
  const float* src = w.data_ptr<float>();
  std::vector<char> finite(C, 1);
  const int64_t grain = std::max<int64_t>(1, kGrain / K);
  at::parallel_for(0, C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      bool ok = true;
      min_max_loop(src + c * K, K, lo_p + c, hi_p + c, &ok);
      finite[c] = ok;
    }
  });
  for (int64_t c = 0; c < C; ++c)
    if (!finite[c]) return {};
  if (running) {  // torch.minimum / torch.maximum with the extremes seen before
    const float* old_lo = prev_lo.data_ptr<float>();
    const float* old_hi = prev_hi.data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) {
      lo_p[c] = std::min(old_lo[c], lo_p[c]);
      hi_p[c] = std::max(old_hi[c], hi_p[c]);
    }
  }
  bool is_signed = signed_policy == 1;
  if (signed_policy < 0)
    for (int64_t c = 0; c < C; ++c) is_signed = is_signed || lo_p[c] < 0.0f;
  const std::vector<int64_t>& range = is_signed ? signed_range : unsigned_range;
  const float qmin = static_cast<float>(range[0]), qmax = static_cast<float>(range[1]);
  const float levels = static_cast<float>(range[1] - range[0]), floor_eps = static_cast<float>(eps);
  auto scale = torch::empty({C}, w.options());
  auto zero_point = torch::zeros({C}, w.options().dtype(torch::kInt32));
  float* scale_p = scale.data_ptr<float>();
  int32_t* zero_p = zero_point.data_ptr<int32_t>();
  std::vector<float> inverse(C), zero(C, 0.0f);
  for (int64_t c = 0; c < C; ++c) {  // affine_qparams, operation by operation in float32
    const float l = std::min(lo_p[c], 0.0f), h = std::max(hi_p[c], 0.0f);
    float sc;
    if (symmetric) {
      sc = std::max(std::abs(l), h) / qmax;
    } else {
      sc = (h - l) / levels;
    }
    sc = sc < floor_eps ? floor_eps : sc;
    if (!symmetric) {
      zero[c] = clamp(qmin - round_half_even(l / sc), qmin, qmax);
      zero_p[c] = static_cast<int32_t>(zero[c]);
    }
    scale_p[c] = sc;
    inverse[c] = 1.0f / sc;  // torch's 1.0 / scale: a float32 reciprocal
  }
  auto out = torch::empty_like(w);
  auto inside = with_mask ? bool_like(w) : torch::Tensor();
  float* dst = out.data_ptr<float>();
  uint8_t* mask = with_mask ? bytes(inside) : nullptr;
  at::parallel_for(0, C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c)
      affine_loop(src + c * K, dst + c * K, mask ? mask + c * K : nullptr, K, inverse[c], scale_p[c], zero[c], qmin, qmax);
  });
  return {out, inside, lo, hi, scale, zero_point, torch::tensor(static_cast<uint8_t>(is_signed))};
}

// The clip-STE gradient grad · mask, as torch's grad * mask computes it.
torch::Tensor masked_product(torch::Tensor grad, torch::Tensor inside) {
  check_dense_float(grad, "grad");
  check_mask(inside, grad);
  auto out = torch::empty_like(grad);
  const float* g = grad.data_ptr<float>();
  const uint8_t* mask = bytes(inside);
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
    masked_product_loop(g + begin, mask + begin, dst + begin, end - begin);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sign_forward", &sign_forward, "sign(x) and the mask |x| < 1, one pass");
  m.def("clamp_round_forward", &clamp_round_forward, "DoReFa activation and its clamp mask, one pass");
  m.def("clamp_round_backward", &clamp_round_backward, "DoReFa activation's gradient, one pass");
  m.def("affine_forward", &affine_forward, "per-tensor affine fake-quant and its clip mask, one pass");
  m.def("min_max", &min_max, "(min, max, all finite) in one read");
  m.def("masked_product", &masked_product, "grad * mask, one pass");
  m.def("channel_affine_forward", &channel_affine_forward,
        "per-channel weight extremes, affine parameters and fake-quant with its clip mask, one call");
}
