// Float transcendental functions used by the kernels, one definition per target.
//
// On the GPU, exp and sincos are CUDA's own expf/sincosf; log is the host polynomial on both
// (see log_f32). On the host they are branch-free Cephes-style polynomials (about 1-2 ulp),
// written so that gcc vectorizes a loop that calls them (libm's scalar calls would stop the
// vectorizer). Double precision uses libm.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace robustmm {

RMM_HOST_DEVICE float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

RMM_HOST_DEVICE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

// Round to nearest integer (|x| < 2^22) without a libm call: adding 1.5*2^23 pushes the
// fraction out of the mantissa.
RMM_HOST_DEVICE float round_small(float x) {
  const float magic = 12582912.0f;
  return (x + magic) - magic;
}

// 2^n for integer n in [-126, 127], built from the exponent bits.
RMM_HOST_DEVICE float pow2i(int32_t n) {
  return bits_to_float(static_cast<uint32_t>(n + 127) << 23);
}

RMM_HOST_DEVICE float exp_f32(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  // exp(x) = 2^n * exp(r), x = n*ln2 + r, |r| <= ln2/2. The clamp keeps n in [-150, 129];
  // 2^n is applied in two halves so results overflow to inf and underflow through
  // the subnormals like libm's. NaN passes through the comparisons untouched.
  float xc = x < -104.0f ? -104.0f : x;
  xc = xc > 89.0f ? 89.0f : xc;
  float n = round_small(xc * 1.44269504088896341f);
  n = (n == n) ? n : 0.0f;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t half = ni / 2;
  return p * pow2i(half) * pow2i(ni - half);
#endif
}

RMM_HOST_DEVICE double exp_f32(double x) { return ::exp(x); }

// Natural log for x in (0, +inf) normal floats (the Box-Muller input is in [1e-7, 1)).
// The GPU uses this polynomial too, not logf: the CUDA extension is built with --use_fast_math,
// which turns logf into __logf, whose absolute error (2^-21.4 on [0.5, 2]) exceeds |log u| for u
// just below 1, so -2 log(u) could come out negative and Box-Muller's sqrt NaN.
RMM_HOST_DEVICE float log_f32(float x) {
  const uint32_t bits = float_to_bits(x);
  float e = static_cast<float>(static_cast<int32_t>((bits >> 23) & 0xffu) - 126);
  float m = bits_to_float((bits & 0x007fffffu) | 0x3f000000u);  // m in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? (m + m - 1.0f) : (m - 1.0f);
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + e * 0.693359375f;
}

// sin and cos of x for x in [0, 2*pi] (the Box-Muller angle).
RMM_HOST_DEVICE void sincos_f32(float x, float* s, float* c) {
#if defined(__CUDA_ARCH__)
  sincosf(x, s, c);
#else
  // Reduce by multiples of pi/4 rounded to even (Cody-Waite, three parts of pi/4), then
  // pick the polynomial and sign by quadrant.
  int32_t j = static_cast<int32_t>(x * 1.27323954473516f);
  j = (j + 1) & ~1;
  const float y = static_cast<float>(j);
  float r = x - y * 0.78515625f;
  r = r - y * 2.4187564849853515625e-4f;
  r = r - y * 3.77489497744594108e-8f;
  const float z = r * r;
  float cp = 2.443315711809948e-5f;
  cp = cp * z - 1.388731625493765e-3f;
  cp = cp * z + 4.166664568298827e-2f;
  cp = cp * z * z - 0.5f * z + 1.0f;
  float sp = -1.9515295891e-4f;
  sp = sp * z + 8.3321608736e-3f;
  sp = sp * z - 1.6666654611e-1f;
  sp = sp * z * r + r;
  const int32_t q = (j >> 1) & 3;
  const float sin_v = (q & 1) ? cp : sp;
  const float cos_v = (q & 1) ? sp : cp;
  *s = (q & 2) ? -sin_v : sin_v;
  *c = ((q + 1) & 2) ? -cos_v : cos_v;
#endif
}

}  // namespace robustmm
