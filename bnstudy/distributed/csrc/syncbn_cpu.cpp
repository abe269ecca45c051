// CPU sync BN's per-layer arithmetic around its two exchanges, compiled: the same four functions, with the same
// formulas in the same order, as bnstudy/distributed/syncbn_math.py (the reference; its docstrings state the
// contract). Compiled because each of the ~25 small torch/NumPy calls the reference makes a layer costs 5-30 us
// from Python on a small CPU; here they are plain loops over channels and direct ATen calls.
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

at::ScalarType statistics_type(const at::Tensor& x) { return at::promote_types(x.scalar_type(), at::kFloat); }

std::vector<int64_t> channel_shape(const at::Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return shape;
}

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace

at::Tensor statistics_table(const at::Tensor& x, int64_t rank, int64_t world_size) {
  const int64_t channels = x.size(1);
  const auto type = statistics_type(x);
  const auto options = at::TensorOptions().dtype(type);
  auto rows = at::zeros({world_size, 1 + 2 * channels}, options);
  const int64_t count = channels ? x.numel() / channels : 0;
  if (count == 0) return rows;
  // For reduced-precision input the native kernel reduces in the dtype of the (scratch) running buffers.
  const auto stats = x.scalar_type() == type
      ? at::batch_norm_update_stats(x, {}, {}, 0.0)
      : at::batch_norm_update_stats(x, at::zeros({channels}, options), at::ones({channels}, options), 0.0);
  const auto mean = std::get<0>(stats).contiguous();
  const auto var = std::get<1>(stats).contiguous();
  AT_DISPATCH_FLOATING_TYPES(type, "statistics_table", [&] {
    scalar_t* row = rows.data_ptr<scalar_t>() + rank * (1 + 2 * channels);
    const scalar_t* m = mean.data_ptr<scalar_t>();
    const scalar_t* v = var.data_ptr<scalar_t>();
    row[0] = static_cast<scalar_t>(count);
    for (int64_t c = 0; c < channels; ++c) {
      row[1 + c] = m[c];
      row[1 + channels + c] = v[c];
    }
  });
  return rows;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> normalise(
    const at::Tensor& rows, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double eps, double momentum) {
  const int64_t world_size = rows.size(0);
  const int64_t channels = x.size(1);
  const auto table_rows = rows.contiguous();
  auto mean = at::empty({channels}, rows.options());
  auto var = at::empty({channels}, rows.options());
  auto invstd = at::empty({channels}, rows.options());
  int64_t total = 0;
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "normalise", [&] {
    const scalar_t* table = table_rows.data_ptr<scalar_t>();
    const int64_t width = 1 + 2 * channels;
    scalar_t count = 0;
    for (int64_t k = 0; k < world_size; ++k) count += table[k * width];
    const scalar_t denominator = count > 1 ? count : scalar_t(1);
    std::vector<scalar_t> weights(world_size);
    for (int64_t k = 0; k < world_size; ++k) weights[k] = table[k * width] / denominator;
    scalar_t* m = mean.data_ptr<scalar_t>();
    scalar_t* v = var.data_ptr<scalar_t>();
    scalar_t* s = invstd.data_ptr<scalar_t>();
    // Chan et al.'s parallel combination of (count, mean, biased variance) rows.
    for (int64_t c = 0; c < channels; ++c) {
      scalar_t mean_c = 0;
      for (int64_t k = 0; k < world_size; ++k) mean_c += weights[k] * table[k * width + 1 + c];
      scalar_t var_c = 0;
      for (int64_t k = 0; k < world_size; ++k) {
        const scalar_t deviation = table[k * width + 1 + c] - mean_c;
        var_c += weights[k] * (table[k * width + 1 + channels + c] + deviation * deviation);
      }
      m[c] = mean_c;
      v[c] = var_c;
      s[c] = scalar_t(1) / std::sqrt(var_c + static_cast<scalar_t>(eps));
    }
    total = static_cast<int64_t>(count);
  });
  if (total <= 1) {
    throw pybind11::value_error(
        "SyncBatchNorm needs more than 1 value per channel across all ranks when training, got " +
        std::to_string(total));
  }
  if (present(running_mean)) {
    at::NoGradGuard no_grad;
    running_mean->mul_(1 - momentum).add_(mean, momentum);
    running_var->mul_(1 - momentum).add_(var * (static_cast<double>(total) / (total - 1)), momentum);
  }
  // Eval-mode native batch norm normalises with given statistics in one elementwise pass.
  auto out = at::batch_norm(x, weight, bias, mean, var, false, 0.0, eps, false);
  return {out, mean, invstd, total};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gradient_sums(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& invstd, double eps) {
  auto dy = grad_out.contiguous(x.suggest_memory_format());
  at::Tensor grad_weight;
  at::Tensor grad_bias;
  if (x.numel() > 0) {
    auto grads = at::native_batch_norm_backward(dy, x, weight, {}, {}, mean, invstd, true, eps, {false, true, true});
    grad_weight = std::get<1>(grads);
    grad_bias = std::get<2>(grads);
  } else {
    grad_weight = at::zeros_like(mean);
    grad_bias = at::zeros_like(mean);
  }
  // The cast is a no-op unless these are bf16 (the gradients of an affine=False layer under autocast).
  auto sums = at::cat({grad_bias, grad_weight}).to(mean.scalar_type());
  return {sums, grad_weight, grad_bias, dy};
}

at::Tensor input_gradient(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                          const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sums, int64_t total) {
  const int64_t channels = x.size(1);
  auto scale = present(weight) ? weight->detach().to(mean.scalar_type()) * invstd : invstd;
  auto k_x = at::empty({channels}, mean.options());
  auto k_0 = at::empty({channels}, mean.options());
  const auto summed = sums.contiguous();
  const auto scale_c = scale.contiguous();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "input_gradient", [&] {
    const scalar_t* sum_dy = summed.data_ptr<scalar_t>();
    const scalar_t* sum_dy_xhat = sum_dy + channels;
    const scalar_t* m = mean.data_ptr<scalar_t>();
    const scalar_t* s = invstd.data_ptr<scalar_t>();
    const scalar_t* a = scale_c.data_ptr<scalar_t>();
    scalar_t* kx = k_x.data_ptr<scalar_t>();
    scalar_t* k0 = k_0.data_ptr<scalar_t>();
    const scalar_t n = static_cast<scalar_t>(total);
    // dx = scale * (dy - sum_dy/N - xhat * sum_dy_xhat/N) = scale*dy + k_x*x + k_0
    for (int64_t c = 0; c < channels; ++c) {
      kx[c] = -a[c] * s[c] * sum_dy_xhat[c] / n;
      k0[c] = -a[c] * sum_dy[c] / n - kx[c] * m[c];
    }
  });
  const auto shape = channel_shape(x);
  auto grad_in = at::addcmul(k_0.view(shape), x, k_x.view(shape));
  grad_in.addcmul_(dy, scale_c.view(shape));
  return grad_in.to(x.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("statistics_table", &statistics_table);
  m.def("normalise", &normalise);
  m.def("gradient_sums", &gradient_sums);
  m.def("input_gradient", &input_gradient);
}
