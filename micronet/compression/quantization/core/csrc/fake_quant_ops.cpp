// The binary activation's forward in one pass: sign(x) (sign(0) = +1, NaN -> -1) and the hardtanh
// straight-through mask |x| < 1, in x's own dense layout (NCHW or channels-last). torch needs four passes
// (abs, lt, ge, where) and three temporaries for the same two tensors. (The backward, one torch.where, is
// already one vectorised pass: a scalar loop here was slower.)
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace {

constexpr int64_t kGrain = 1 << 14;

void check_dense_float(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, what, " must be a float32 CPU tensor");
  TORCH_CHECK(t.is_non_overlapping_and_dense(), what, " must be dense");
}

std::vector<torch::Tensor> sign_forward(torch::Tensor x) {
  check_dense_float(x, "x");
  auto out = torch::empty_like(x);
  auto inside = torch::empty_like(x, x.options().dtype(torch::kBool));
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  uint8_t* mask = reinterpret_cast<uint8_t*>(inside.data_ptr<bool>());
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    // branch-free bodies (bitwise &, a select), so that the compiler vectorises both loops
    for (int64_t i = begin; i < end; ++i) dst[i] = src[i] >= 0.0f ? 1.0f : -1.0f;
    for (int64_t i = begin; i < end; ++i) mask[i] = static_cast<uint8_t>((src[i] > -1.0f) & (src[i] < 1.0f));
  });
  return {out, inside};
}

// DoReFa's activation, round(clamp(x·p, 0, 1)·n) / n, and the mask of the clamp's linear range, in one pass;
// each float operation is the one torch's chain performs, in the same order, so the values are identical
// (torch.clamp keeps NaN, as the comparisons below do; torch.round is nearbyint; half_away is
// sign(v)·floor(|v| + 0.5), which for v >= 0 or NaN is floor(v + 0.5)).
std::vector<torch::Tensor> clamp_round_forward(torch::Tensor x, double pre_scale, int64_t levels, bool half_away) {
  check_dense_float(x, "x");
  auto out = torch::empty_like(x);
  auto inside = torch::empty_like(x, x.options().dtype(torch::kBool));
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  uint8_t* mask = reinterpret_cast<uint8_t*>(inside.data_ptr<bool>());
  const float p = static_cast<float>(pre_scale), n = static_cast<float>(levels);
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float scaled = src[i] * p;
      const float clipped = scaled < 0.0f ? 0.0f : (scaled > 1.0f ? 1.0f : scaled);
      mask[i] = static_cast<uint8_t>(clipped == scaled);
      const float v = clipped * n;
      dst[i] = (half_away ? std::floor(v + 0.5f) : std::nearbyint(v)) / n;
    }
  });
  return {out, inside};
}

// Its gradient: ((g / n) · n where the mask is set, else 0) · p, as torch's chain computes it.
torch::Tensor clamp_round_backward(torch::Tensor grad, torch::Tensor inside, double pre_scale, int64_t levels) {
  check_dense_float(grad, "grad");
  TORCH_CHECK(inside.scalar_type() == torch::kBool && inside.strides() == grad.strides() &&
              inside.sizes() == grad.sizes(), "mask and gradient must share shape and layout");
  auto out = torch::empty_like(grad);
  const float* g = grad.data_ptr<float>();
  const uint8_t* mask = reinterpret_cast<const uint8_t*>(inside.data_ptr<bool>());
  float* dst = out.data_ptr<float>();
  const float p = static_cast<float>(pre_scale), n = static_cast<float>(levels);
  at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = (mask[i] ? (g[i] / n) * n : 0.0f) * p;
  });
  return out;
}

// Per-tensor affine quantize-dequantize, as micronet's torch chain computes it:
// q = clamp(nearbyint(x · inv_scale) + z, lo, hi), x̂ = (q − z) · scale, and the clip-STE mask
// lo ≤ nearbyint(x · inv_scale) + z ≤ hi (NaN: outside; torch.clamp keeps NaN, as the comparisons do).
std::vector<torch::Tensor> affine_forward(torch::Tensor x, double inv_scale, double scale, double zero_point,
                                          double quant_min, double quant_max, bool with_mask) {
  check_dense_float(x, "x");
  auto out = torch::empty_like(x);
  auto inside = with_mask ? torch::empty_like(x, x.options().dtype(torch::kBool)) : torch::Tensor();
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  uint8_t* mask = with_mask ? reinterpret_cast<uint8_t*>(inside.data_ptr<bool>()) : nullptr;
  const float inv = static_cast<float>(inv_scale), s = static_cast<float>(scale), z = static_cast<float>(zero_point);
  const float lo = static_cast<float>(quant_min), hi = static_cast<float>(quant_max);
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float q = std::nearbyint(src[i] * inv) + z;
      const float clamped = q < lo ? lo : (q > hi ? hi : q);
      dst[i] = (clamped - z) * s;
    }
    if (mask != nullptr)
      for (int64_t i = begin; i < end; ++i) {
        const float q = std::nearbyint(src[i] * inv) + z;
        mask[i] = static_cast<uint8_t>((q >= lo) & (q <= hi));
      }
  });
  return {out, inside};
}

// The clip-STE gradient grad · mask, as torch's grad * mask computes it (0 · inf and 0 · NaN stay NaN).
torch::Tensor masked_product(torch::Tensor grad, torch::Tensor inside) {
  check_dense_float(grad, "grad");
  TORCH_CHECK(inside.scalar_type() == torch::kBool && inside.strides() == grad.strides() &&
              inside.sizes() == grad.sizes(), "mask and gradient must share shape and layout");
  auto out = torch::empty_like(grad);
  const float* g = grad.data_ptr<float>();
  const uint8_t* mask = reinterpret_cast<const uint8_t*>(inside.data_ptr<bool>());
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = g[i] * static_cast<float>(mask[i]);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sign_forward", &sign_forward, "sign(x) and the mask |x| < 1, one pass");
  m.def("clamp_round_forward", &clamp_round_forward, "DoReFa activation and its clamp mask, one pass");
  m.def("affine_forward", &affine_forward, "per-tensor affine fake-quant and its clip mask, one pass");
  m.def("masked_product", &masked_product, "grad * mask, one pass");
  m.def("clamp_round_backward", &clamp_round_backward, "DoReFa activation's gradient, one pass");
}
