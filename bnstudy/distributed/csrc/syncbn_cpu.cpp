// CPU sync BN's per-layer arithmetic around its two exchanges, compiled: the same four functions, with the same
// formulas in the same order, as bnstudy/distributed/syncbn_math.py (the reference; its docstrings state the
// contract). Compiled because each of the ~25 small torch/NumPy calls the reference makes a layer costs 5-30 us
// from Python on a small CPU; here they are plain loops over channels and direct ATen calls.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/extension.h>

#include <sched.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

// a * b + c rounded as ATen's CPU kernels round it, so the fused passes below give ATen's bits: once (a fused
// multiply-add) where bnstudy builds with -mfma, which it does where PyTorch runs its AVX2/AVX-512 kernels (built
// with FMA, and they contract), twice elsewhere. The build's -ffp-contract=off keeps every other expression unfused.
template <typename T>
inline T multiply_add(T a, T b, T c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

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

// running <- (1 - momentum) * running + momentum * batch statistic (the variance unbiased), as a loop over channels
// where the buffers are contiguous in the statistics' dtype (as ATen ops they are 5 calls of a few us each).
static void update_running(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                           const at::Tensor& var, int64_t total, double momentum) {
  const double unbias = static_cast<double>(total) / (total - 1);
  const bool loop = running_mean.scalar_type() == mean.scalar_type() &&
                    running_var.scalar_type() == mean.scalar_type() && running_mean.is_contiguous() &&
                    running_var.is_contiguous() && running_mean.device().is_cpu() && running_var.device().is_cpu();
  if (!loop) {
    at::NoGradGuard no_grad;
    running_mean.mul_(1 - momentum).add_(mean, momentum);
    running_var.mul_(1 - momentum).add_(var * unbias, momentum);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "update_running", [&] {
    const scalar_t keep = static_cast<scalar_t>(1 - momentum);
    const scalar_t take = static_cast<scalar_t>(momentum);
    const scalar_t u = static_cast<scalar_t>(unbias);
    const scalar_t* m = mean.const_data_ptr<scalar_t>();
    const scalar_t* v = var.const_data_ptr<scalar_t>();
    scalar_t* rm = running_mean.data_ptr<scalar_t>();
    scalar_t* rv = running_var.data_ptr<scalar_t>();
    const int64_t channels = mean.numel();
    for (int64_t c = 0; c < channels; ++c) {
      rm[c] = multiply_add(m[c], take, rm[c] * keep);
      rv[c] = multiply_add(v[c] * u, take, rv[c] * keep);
    }
  });
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
  if (present(running_mean)) update_running(*running_mean, *running_var, mean, var, total, momentum);
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

// dx = scale*dy + k_x*x + k_0, computed in x's opmath type and rounded once to x's dtype: one pass over x and dy
// when both are dense in x's memory format (what a conv net hands over), else the reference's two addcmul passes.
// A channels-last tensor is (rows, C) in memory, a contiguous one (N*C, spatial).
static bool fused_input_gradient(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& k_x,
                                 const at::Tensor& k_0, const at::Tensor& scale, at::Tensor& grad_in) {
  const auto format = x.suggest_memory_format();
  if (dy.scalar_type() != x.scalar_type() || !x.is_contiguous(format) || !dy.is_contiguous(format)) return false;
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "input_gradient", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (k_x.scalar_type() != c10::CppTypeToScalarType<acc_t>::value) return;
    grad_in = at::empty_like(x, format);
    const int64_t channels = x.size(1);
    const int64_t numel = x.numel();
    if (numel == 0) {
      done = true;
      return;
    }
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const scalar_t* dys = dy.const_data_ptr<scalar_t>();
    scalar_t* out = grad_in.data_ptr<scalar_t>();
    const acc_t* kx = k_x.const_data_ptr<acc_t>();
    const acc_t* k0 = k_0.const_data_ptr<acc_t>();
    const acc_t* a = scale.const_data_ptr<acc_t>();
    if (format != at::MemoryFormat::Contiguous) {
      at::parallel_for(0, numel / channels, 1 + (1 << 14) / channels, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t o = r * channels;
          for (int64_t c = 0; c < channels; ++c) {
            out[o + c] = static_cast<scalar_t>(multiply_add(
                static_cast<acc_t>(dys[o + c]), a[c], multiply_add(static_cast<acc_t>(xs[o + c]), kx[c], k0[c])));
          }
        }
      });
    } else {
      const int64_t spatial = numel / (x.size(0) * channels);
      at::parallel_for(0, numel / spatial, 1 + (1 << 14) / spatial, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t c = plane % channels;
          const int64_t o = plane * spatial;
          for (int64_t i = 0; i < spatial; ++i) {
            out[o + i] = static_cast<scalar_t>(multiply_add(
                static_cast<acc_t>(dys[o + i]), a[c], multiply_add(static_cast<acc_t>(xs[o + i]), kx[c], k0[c])));
          }
        }
      });
    }
    done = true;
  });
  return done;
}

at::Tensor input_gradient(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                          const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sums, int64_t total) {
  const int64_t channels = x.size(1);
  const auto scale = (present(weight) ? weight->detach().to(mean.scalar_type()) * invstd : invstd).contiguous();
  auto k_x = at::empty({channels}, mean.options());
  auto k_0 = at::empty({channels}, mean.options());
  const auto summed = sums.contiguous();
  const auto mean_c = mean.contiguous();
  const auto invstd_c = invstd.contiguous();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "input_gradient_coefficients", [&] {
    const scalar_t* sum_dy = summed.data_ptr<scalar_t>();
    const scalar_t* sum_dy_xhat = sum_dy + channels;
    const scalar_t* m = mean_c.data_ptr<scalar_t>();
    const scalar_t* s = invstd_c.data_ptr<scalar_t>();
    const scalar_t* a = scale.data_ptr<scalar_t>();
    scalar_t* kx = k_x.data_ptr<scalar_t>();
    scalar_t* k0 = k_0.data_ptr<scalar_t>();
    const scalar_t n = static_cast<scalar_t>(total);
    // dx = scale * (dy - sum_dy/N - xhat * sum_dy_xhat/N) = scale*dy + k_x*x + k_0
    for (int64_t c = 0; c < channels; ++c) {
      kx[c] = -a[c] * s[c] * sum_dy_xhat[c] / n;
      k0[c] = -a[c] * sum_dy[c] / n - kx[c] * m[c];
    }
  });
  at::Tensor grad_in;
  if (fused_input_gradient(dy, x, k_x, k_0, scale, grad_in)) return grad_in;
  const auto shape = channel_shape(x);
  grad_in = at::addcmul(k_0.view(shape), x, k_x.view(shape));
  grad_in.addcmul_(dy, scale.view(shape));
  return grad_in.to(x.scalar_type());
}

namespace {

// The Python callable that sums a tensor over the ranks in place (the transport's all-reduce). An autograd node holds
// it and may be freed on a thread that does not hold the GIL, so the reference is dropped under the GIL.
class Exchange {
 public:
  explicit Exchange(pybind11::object all_reduce) : all_reduce_(all_reduce.release().ptr()) {}
  Exchange(const Exchange&) = delete;
  Exchange& operator=(const Exchange&) = delete;
  ~Exchange() {
    if (Py_IsInitialized()) {
      pybind11::gil_scoped_acquire gil;
      Py_DECREF(all_reduce_);
    }
  }
  // A Python exception (a lost peer, mismatched sizes) propagates as itself, through backward too.
  void operator()(const at::Tensor& tensor) const {
    pybind11::gil_scoped_acquire gil;
    const pybind11::handle all_reduce(all_reduce_);
    all_reduce(tensor);
  }

 private:
  PyObject* all_reduce_;
};

// Backward of one sync BN layer: gradient sums, their exchange, the input gradient; no Python but the exchange.
struct SyncBatchNormBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable x, weight;
  at::Tensor mean, invstd;
  double eps = 0;
  int64_t total = 0;
  std::shared_ptr<Exchange> exchange;

  std::string name() const override { return "SyncBatchNormBackward"; }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    at::NoGradGuard no_grad;
    const auto input = x.unpack();
    const auto w = weight.unpack();
    const std::optional<at::Tensor> weight_or_none = w.defined() ? std::optional<at::Tensor>(w) : std::nullopt;
    // Every rank exchanges, even one whose output got no gradient.
    const auto grad_out = grads[0].defined() ? grads[0] : at::zeros_like(input);
    auto [sums, grad_weight, grad_bias, dy] = gradient_sums(grad_out, input, weight_or_none, mean, invstd, eps);
    (*exchange)(sums);
    auto grad_in = input_gradient(dy, input, weight_or_none, mean, invstd, sums, total);
    if (!w.defined()) return {grad_in, at::Tensor(), at::Tensor()};
    return {grad_in, grad_weight, grad_bias};
  }

  void release_variables() override {
    x.reset_data();
    weight.reset_data();
    mean.reset();
    invstd.reset();
  }
};

}  // namespace

// One sync BN layer in training, as an autograd op: forward (statistics, exchange, normalise) in one call from
// Python and backward with none, which is what the layer costs over plain BN in a small model.
at::Tensor sync_batch_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                           const std::optional<at::Tensor>& running_var, double eps, double momentum, int64_t rank,
                           int64_t world_size, pybind11::object all_reduce) {
  RECORD_FUNCTION("SyncBatchNorm", c10::ArrayRef<const c10::IValue>{});
  TORCH_CHECK(!torch::autograd::isFwGradDefined(x) && !torch::autograd::isFwGradDefined(weight) &&
                  !torch::autograd::isFwGradDefined(bias),
              "SyncBatchNorm on CPU has no forward-mode AD (jvp); use reverse mode or plain BatchNorm");
  auto exchange = std::make_shared<Exchange>(std::move(all_reduce));
  at::Tensor out, mean, invstd;
  int64_t total = 0;
  {
    at::NoGradGuard no_grad;
    auto rows = statistics_table(x, rank, world_size);
    (*exchange)(rows);
    std::tie(out, mean, invstd, total) = normalise(rows, x, weight, bias, running_mean, running_var, eps, momentum);
  }
  const auto w = present(weight) ? *weight : at::Tensor();
  const auto b = present(bias) ? *bias : at::Tensor();
  if (!torch::autograd::compute_requires_grad(x, w, b)) return out;
  auto node = c10::make_intrusive<SyncBatchNormBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, w, b));
  node->x = torch::autograd::SavedVariable(x, false);
  node->weight = torch::autograd::SavedVariable(w, false);
  node->mean = mean;
  node->invstd = invstd;
  node->eps = eps;
  node->total = total;
  node->exchange = std::move(exchange);
  torch::autograd::set_history(out, node);
  return out;
}

// The compiled build of ShmAllReduce's exchange (bnstudy/distributed/shm_allreduce.py states the protocol and keeps
// the errors): the same segment layout, stores and rank-ordered sums, so a rank running either build can meet a rank
// running the other. Here the publishing store has release and the polling loads acquire semantics, so the order
// holds by the language's memory model, not only by x86-64's.
class ShmExchange {
 public:
  ShmExchange(int64_t address, int64_t rank, int64_t world_size, int64_t line_words, int64_t data_offset,
              int64_t row_bytes, double timeout_s, std::string wait_label)
      : wait_label_(std::move(wait_label)),
        base_(reinterpret_cast<char*>(address)),
        ctrl_(reinterpret_cast<int64_t*>(address)),
        rank_(rank),
        world_size_(world_size),
        line_words_(line_words),
        data_offset_(data_offset),
        row_bytes_(row_bytes),
        timeout_(timeout_s) {}

  // One generation: publish `flat` (None: the signature only), wait for every rank, check the signatures and sum
  // the rows in rank order into `flat`. Returns 0, 1 when a rank did not arrive in time (late_ranks() names them),
  // 2 when the signatures differ. A wait shows in profiler traces as `wait_label`.
  int64_t exchange(const std::optional<at::Tensor>& flat, int64_t signature, int64_t generation) {
    const int64_t parity = generation & 1;
    const bool data = present(flat) && flat->numel() > 0;
    if (data) std::memcpy(row(parity, rank_), flat->data_ptr(), flat->nbytes());
    *signature_word(parity, rank_) = signature;
    __atomic_store_n(sequence_word(rank_), generation, __ATOMIC_RELEASE);
    if (!everyone_at(generation)) {
      RECORD_USER_SCOPE(std::string_view(wait_label_));
      pybind11::gil_scoped_release no_gil;
      if (!wait_for(generation)) return 1;
    }
    for (int64_t j = 0; j < world_size_; ++j) {
      if (*signature_word(parity, j) != signature) return 2;
    }
    if (data) {
      AT_DISPATCH_FLOATING_TYPES(flat->scalar_type(), "shm_exchange", [&] {
        const int64_t n = flat->numel();
        scalar_t* out = flat->data_ptr<scalar_t>();
        const auto* r0 = reinterpret_cast<const scalar_t*>(row(parity, 0));
        const auto* r1 = reinterpret_cast<const scalar_t*>(row(parity, 1));
        for (int64_t i = 0; i < n; ++i) out[i] = r0[i] + r1[i];
        for (int64_t j = 2; j < world_size_; ++j) {
          const auto* rj = reinterpret_cast<const scalar_t*>(row(parity, j));
          for (int64_t i = 0; i < n; ++i) out[i] += rj[i];
        }
      });
    }
    return 0;
  }

  const std::vector<int64_t>& late_ranks() const { return late_; }

 private:
  int64_t* sequence_word(int64_t j) const { return ctrl_ + line_words_ * (1 + j); }
  int64_t* signature_word(int64_t parity, int64_t j) const { return ctrl_ + line_words_ * (1 + j) + 1 + parity; }
  char* row(int64_t parity, int64_t j) const { return base_ + data_offset_ + (parity * world_size_ + j) * row_bytes_; }

  bool everyone_at(int64_t generation) const {
    for (int64_t j = 0; j < world_size_; ++j) {
      if (__atomic_load_n(sequence_word(j), __ATOMIC_ACQUIRE) < generation) return false;
    }
    return true;
  }

  bool wait_for(int64_t generation) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_);
    while (!everyone_at(generation)) {
      sched_yield();
      if (std::chrono::steady_clock::now() > deadline) {
        late_.clear();
        for (int64_t j = 0; j < world_size_; ++j) {
          if (__atomic_load_n(sequence_word(j), __ATOMIC_ACQUIRE) < generation) late_.push_back(j);
        }
        if (!late_.empty()) return false;
      }
    }
    return true;
  }

  std::string wait_label_;
  char* base_;
  int64_t* ctrl_;
  std::vector<int64_t> late_;
  int64_t rank_, world_size_, line_words_, data_offset_, row_bytes_;
  double timeout_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("statistics_table", &statistics_table);
  m.def("normalise", &normalise);
  m.def("gradient_sums", &gradient_sums);
  m.def("input_gradient", &input_gradient);
  m.def("sync_batch_norm", &sync_batch_norm);
  pybind11::class_<ShmExchange>(m, "ShmExchange")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, std::string>())
      .def("exchange", &ShmExchange::exchange)
      .def("late_ranks", &ShmExchange::late_ranks);
}
