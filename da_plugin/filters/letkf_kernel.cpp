// The LETKF's local ensemble weights, one grid point at a time, for the CPU (da_plugin/filters/letkf_cpp.py).
//
// For point p with local observations neighbours[p, :] (inverse variances rinv[p, :], zero on padding) and
// the obs-space rows [Y | d] of every observation (``rows``, [m, N + 1]):
//
//     A = (N - 1) I + sum_l r_l y_l y_l^T,   c = sum_l r_l d_l y_l,
//     Z = (A / s)^-1/2 by the order-5 Newton-Schulz iteration of letkf.inverse_sqrt_newton,
//     out[p] = sqrt((N - 1) / s) Z + (Z Z c / s) 1^T          (transform plus mean weights),
//
// the numbers letkf.ensemble_weights(..., solver="newton") computes with batched tensor operations, here
// without a tensor operation per step: small problems spent most of their analysis in the operations'
// overhead. Each point gets its own scale s (the middle of [N - 1, min(Gershgorin, trace bound)]) and its
// own step count, fixed in advance from the bound as in letkf.newton_schulz_steps.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

namespace {

constexpr double kCoefficients[5] = {1.0, 1.0 / 2.0, 3.0 / 8.0, 5.0 / 16.0, 35.0 / 128.0};

int newton_schulz_steps(double error, double eps) {
  int steps = 0;
  while (error > eps) {
    double series = 0.0, power = 1.0;
    for (double c : kCoefficients) {
      series += c * power;
      power *= error;
    }
    const double next = 1.0 - (1.0 - error) * series * series;
    ++steps;
    if (next >= error) break;  // float64 rounding: converged as far as it can tell
    error = next;
  }
  return steps;
}

// Matrices are n x n, stored in rows of a padded stride S >= n (a multiple of 16, zero beyond column n
// and below row n), so the column loops have a length known at compile time and vectorize without
// remainder; four rows at a time give the multiply-adds independent chains. Zero padding stays zero
// through every product and combination below, which therefore run over whole blocks of four rows.
constexpr int kRows = 4;

// c = a b with a(i, k) = a[i * row + k * column] (row = S, column = 1: a padded matrix; row = 1, column =
// S: the transpose of a padded [inner, S] array), b padded [inner, S], c padded [n, S]
template <typename T, int S>
void multiply(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ c, int n, int64_t inner,
              int row = S, int column = 1) {
  typedef T Vec __attribute__((vector_size(64), may_alias));  // (a using-alias would drop the attributes)
  constexpr int kVectors = S * sizeof(T) / 64;  // per padded row
  for (int i = 0; i < n; i += kRows) {
    Vec block[kRows][kVectors] = {};  // the accumulators, in registers
    for (int64_t k = 0; k < inner; ++k) {
      const Vec* bk = reinterpret_cast<const Vec*>(b + k * S);
      for (int r = 0; r < kRows; ++r) {
        const T aik = a[(i + r) * row + k * column];
        for (int v = 0; v < kVectors; ++v) block[r][v] += aik * bk[v];
      }
    }
    Vec* ci = reinterpret_cast<Vec*>(c + i * S);
    for (int r = 0; r < kRows; ++r) {
      for (int v = 0; v < kVectors; ++v) ci[r * kVectors + v] = block[r][v];
    }
  }
}

template <typename T, int S>
struct Workspace {
  alignas(64) T m[S * S], u[S * S], u2[S * S], t[S * S], tt[S * S], z[S * S], tmp[S * S], a[S * S];
  alignas(64) T v[S];
  std::vector<T> storage;  // the local rows, padded: [L, S] as observed and [L, S] times their r_l
  T* observed = nullptr;
  T* weighted = nullptr;

  explicit Workspace(int64_t local) : storage(2 * local * S + 64 / sizeof(T)) {
    void* start = storage.data();
    std::size_t space = storage.size() * sizeof(T);
    observed = static_cast<T*>(std::align(64, 2 * local * S * sizeof(T), start, space));
    weighted = observed + local * S;
  }
};

template <typename T, int S>
void point_weights(const T* rows, const int64_t* neighbours, const T* rinv, int64_t local, int n, double eps,
                   Workspace<T, S>& w, T* out) {
  const int width = n + 1;
  const int used = (n + kRows - 1) / kRows * kRows * S;  // entries of the row blocks in use
  const T lower = T(n - 1);
  // A - (N - 1) I = Y^T R Y and c = Y^T R d from the local rows, padding (r = 0) left out
  int64_t count = 0;
  for (int64_t l = 0; l < local; ++l) {
    const T r = rinv[l];
    if (r == T(0)) continue;
    const T* source = rows + neighbours[l] * width;
    T* y = w.observed + count * S;
    T* ry = w.weighted + count * S;
    for (int j = 0; j < S; ++j) {
      y[j] = j < n ? source[j] : j == n ? source[n] : T(0);  // the innovation rides in column n
      ry[j] = r * y[j];
    }
    ++count;
  }
  multiply<T, S>(w.weighted, w.observed, w.a, n, count, 1, S);
  for (int i = 0; i < n; ++i) {
    w.v[i] = w.a[i * S + n];
    w.a[i * S + n] = T(0);
  }
  std::fill(w.a + n * S, w.a + used, T(0));  // the row of the innovation column times Y
  double gershgorin = 0.0, trace = 0.0;
  for (int i = 0; i < n; ++i) {
    w.a[i * S + i] += lower;
    double row = 0.0;
    for (int j = 0; j < n; ++j) row += std::abs(double(w.a[i * S + j]));
    gershgorin = std::max(gershgorin, row);
    trace += w.a[i * S + i];
  }
  const double upper = std::max(std::min(gershgorin, trace - (n - 1) * double(lower)), double(lower));
  const int steps = newton_schulz_steps((upper - lower) / (upper + lower), eps);
  const double scale = 0.5 * (upper + lower);
  const T inv_scale = T(1.0 / scale);
  for (int e = 0; e < used; ++e) w.m[e] = w.a[e] * inv_scale;
  const T c1 = T(kCoefficients[1]), c2 = T(kCoefficients[2]), c3 = T(kCoefficients[3]);
  const T c4_over_c3 = T(kCoefficients[4] / kCoefficients[3]);
  T* z = w.z;
  T* m = w.m;
  T* spare = w.tmp;
  std::fill(z, z + S * S, T(0));
  for (int i = 0; i < n; ++i) z[i * S + i] = T(1);
  for (int step = 0; step < steps; ++step) {
    for (int e = 0; e < used; ++e) w.u[e] = -m[e];
    for (int i = 0; i < n; ++i) w.u[i * S + i] += T(1);
    multiply<T, S>(w.u, w.u, w.u2, n, n);
    // T = I + c1 U + c2 U^2 + c3 U^2 (U + c4/c3 U^2)
    for (int e = 0; e < used; ++e) w.tt[e] = w.u[e] + c4_over_c3 * w.u2[e];
    multiply<T, S>(w.u2, w.tt, w.t, n, n);
    for (int e = 0; e < used; ++e) w.t[e] = c3 * w.t[e] + c1 * w.u[e] + c2 * w.u2[e];
    for (int i = 0; i < n; ++i) w.t[i * S + i] += T(1);
    if (step == 0) {
      std::copy(w.t, w.t + used, z);
    } else {
      multiply<T, S>(z, w.t, spare, n, n);
      std::swap(z, spare);
    }
    if (step < steps - 1) {
      multiply<T, S>(w.t, w.t, w.tt, n, n);
      multiply<T, S>(m, w.tt, spare, n, n);
      std::swap(m, spare);
    }
  }
  // mean weights Z (Z c) / s, beside the transform sqrt((N - 1) / s) Z in every column
  T zc[S] = {};
  for (int i = 0; i < n; ++i) {
    T sum = 0;
    for (int k = 0; k < n; ++k) sum += z[i * S + k] * w.v[k];
    zc[i] = sum;
  }
  const T root_factor = T(std::sqrt((n - 1) / scale));
  for (int i = 0; i < n; ++i) {
    T mean_weight = 0;
    for (int k = 0; k < n; ++k) mean_weight += z[i * S + k] * zc[k];
    mean_weight *= inv_scale;
    for (int j = 0; j < n; ++j) out[i * n + j] = root_factor * z[i * S + j] + mean_weight;
  }
}

template <typename T, int S>
void all_points(const T* rows, const int64_t* neighbours, const T* rinv, int64_t points, int64_t local, int n,
                T* out) {
  const double eps = std::numeric_limits<T>::epsilon();
  at::parallel_for(0, points, 16, [&](int64_t begin, int64_t end) {
    auto workspace = std::make_unique<Workspace<T, S>>(local);
    for (int64_t p = begin; p < end; ++p) {
      point_weights<T, S>(rows, neighbours + p * local, rinv + p * local, local, n, eps, *workspace, out + p * n * n);
    }
  });
}

}  // namespace

// [P, N, N] weights of every point from rows [m, N + 1], neighbours [P, L] (int64) and rinv [P, L]
torch::Tensor local_weights(torch::Tensor rows, torch::Tensor neighbours, torch::Tensor rinv) {
  TORCH_CHECK(rows.dim() == 2 && neighbours.dim() == 2 && rinv.sizes() == neighbours.sizes(),
              "local_weights: rows [m, N + 1], neighbours and rinv [P, L]");
  TORCH_CHECK(rows.device().is_cpu() && neighbours.device().is_cpu() && rinv.device().is_cpu(),
              "local_weights: CPU tensors only (filter.backend=cpp)");
  TORCH_CHECK(neighbours.scalar_type() == torch::kLong, "local_weights: neighbours must be int64");
  TORCH_CHECK(rows.scalar_type() == rinv.scalar_type(), "local_weights: rows and rinv of one dtype");
  rows = rows.contiguous();
  neighbours = neighbours.contiguous();
  rinv = rinv.contiguous();
  const int64_t points = neighbours.size(0), local = neighbours.size(1);
  const int n = static_cast<int>(rows.size(1)) - 1;
  auto out = torch::empty({points, n, n}, rows.options());
  TORCH_CHECK(n >= 2 && n < 64, "local_weights: 2 to 63 members, found ", n);
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "local_weights", [&] {
    const scalar_t* r = rows.data_ptr<scalar_t>();
    const int64_t* nb = neighbours.data_ptr<int64_t>();
    const scalar_t* ri = rinv.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    if (n < 16) {  // S > n: the innovation rides in column n
      all_points<scalar_t, 16>(r, nb, ri, points, local, n, o);
    } else if (n < 32) {
      all_points<scalar_t, 32>(r, nb, ri, points, local, n, o);
    } else {
      all_points<scalar_t, 64>(r, nb, ri, points, local, n, o);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("local_weights", &local_weights, "LETKF transform plus mean weights per grid point");
}
