// A convolution's kernel gradient on the CPU as an XLA FFI custom call: per image and per
// block of output rows, the block's im2col patches are built in a buffer that stays in the
// core's L2 cache and multiplied into a float32 accumulator by a single-threaded sgemm
// (the OpenBLAS that numpy bundles); images are split over `threads` std::threads, each with
// its own accumulator, summed at the end. Built on first use by jtransfer/models/ffi_conv.py
// and taken by jtransfer/models/gemm_conv.py's 'auto' where it measured faster than XLA's
// backward-filter convolution (docs/decisions.md, "Dense-conv filter gradients").
//
//   dk[i, j, c, o] = sum_{n, h, w} x[n, h*sh + i - pt, w*sw + j - pl, c] * dy[n, h, w, o]
//
// x: (N, H, W, C) float32, dy: (N, OH, OW, O) float32, dk: (kh, kw, C, O) float32; the
// bottom/right padding is implied by OH and OW.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// numpy's bundled OpenBLAS (ILP64, symbols suffixed 64_); CBLAS enums: 101 row-major,
// 111 no-transpose, 112 transpose.
extern "C" void scipy_cblas_sgemm64_(int, int, int, int64_t, int64_t, int64_t, float,
                                     const float*, int64_t, const float*, int64_t, float,
                                     float*, int64_t);
extern "C" int openblas_set_num_threads_local(int);

static ffi::Error FilterGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                 ffi::ResultBuffer<ffi::F32> dk, int64_t kh, int64_t kw,
                                 int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                                 int64_t threads, int64_t rows) {
  auto xd = x.dimensions();
  auto gd = dy.dimensions();
  const int64_t n_img = xd[0], h_in = xd[1], w_in = xd[2], c = xd[3];
  const int64_t oh = gd[1], ow = gd[2], o = gd[3];
  const int64_t k = kh * kw * c;  // patch length, in HWIO's (i, j, c) order
  const float* xs = x.typed_data();
  const float* gs = dy.typed_data();
  threads = std::max<int64_t>(1, std::min(threads, n_img));
  // Every buffer is allocated here, before any thread starts: an allocation failure becomes
  // an error XLA reports, never an exception escaping a worker thread (std::terminate).
  std::vector<std::vector<float>> accs, bufs;
  try {
    accs.assign(threads, std::vector<float>(k * o, 0.f));
    bufs.assign(threads, std::vector<float>(std::max<int64_t>(1, rows * ow * k)));
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "jtransfer_filter_grad: out of memory for its patch buffers");
  }
  auto work = [&](int64_t t) {
    // The threads here are the parallelism; the caller's own setting (this may be XLA's or
    // Python's thread) is put back afterwards.
    const int before = openblas_set_num_threads_local(1);
    float* acc = accs[t].data();
    for (int64_t n = t; n < n_img; n += threads) {
      for (int64_t h0 = 0; h0 < oh; h0 += rows) {
        const int64_t h1 = std::min(oh, h0 + rows);
        float* p = bufs[t].data();
        for (int64_t h = h0; h < h1; ++h)
          for (int64_t w = 0; w < ow; ++w)
            for (int64_t i = 0; i < kh; ++i) {
              const int64_t ih = h * sh + i - pt;
              for (int64_t j = 0; j < kw; ++j, p += c) {
                const int64_t iw = w * sw + j - pl;
                if (ih < 0 || ih >= h_in || iw < 0 || iw >= w_in)
                  std::memset(p, 0, c * sizeof(float));
                else
                  std::memcpy(p, xs + ((n * h_in + ih) * w_in + iw) * c, c * sizeof(float));
              }
            }
        // acc (k, o) += patches^T (k, pos) @ dy_block (pos, o)
        scipy_cblas_sgemm64_(101, 112, 111, k, o, (h1 - h0) * ow, 1.f, bufs[t].data(), k,
                             gs + (n * oh + h0) * ow * o, o, 1.f, acc, o);
      }
    }
    openblas_set_num_threads_local(before > 0 ? before : 1);
  };
  std::vector<std::thread> pool;
  int64_t started = 1;
  try {
    for (; started < threads; ++started) pool.emplace_back(work, started);
  } catch (const std::system_error&) {
    // no more threads to be had: the shares of those not started run on this one
  }
  work(0);
  for (int64_t t = started; t < threads; ++t) work(t);
  for (auto& th : pool) th.join();
  float* out = dk->typed_data();
  std::memcpy(out, accs[0].data(), k * o * sizeof(float));
  for (int64_t t = 1; t < threads; ++t)
    for (int64_t e = 0; e < k * o; ++e) out[e] += accs[t][e];
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FilterGrad, FilterGradImpl,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Attr<int64_t>("kh").Attr<int64_t>("kw").Attr<int64_t>("sh").Attr<int64_t>("sw")
        .Attr<int64_t>("pt").Attr<int64_t>("pl").Attr<int64_t>("threads").Attr<int64_t>("rows"));
