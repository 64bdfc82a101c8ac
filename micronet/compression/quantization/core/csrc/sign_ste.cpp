// The binary activation's forward in one pass: sign(x) (sign(0) = +1, NaN -> -1) and the hardtanh
// straight-through mask |x| < 1, in x's own dense layout (NCHW or channels-last). torch needs four passes
// (abs, lt, ge, where) and three temporaries for the same two tensors. (The backward, one torch.where, is
// already one vectorised pass: a scalar loop here was slower.)
#include <torch/extension.h>
#include <ATen/Parallel.h>

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sign_forward", &sign_forward, "sign(x) and the mask |x| < 1, one pass");
}
