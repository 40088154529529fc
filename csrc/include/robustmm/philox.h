// Counter-based normal random numbers, bit-compatible with Triton's tl.randn4x(seed, offset).
//
// Philox4x32-10 (Salmon et al., SC'11) keyed by the 64-bit seed (k0 = low 32 bits,
// k1 = high 32 bits) on the counter (offset_lo, offset_hi, 0, 0); each 32-bit output becomes
// a uniform u = (x < 0 ? ~x : x) * 4.6566127342e-10 (x read as int32), and the pairs
// (u1, u2), (u3, u4) go through Box-Muller:
//   n1 = r cos(th), n2 = r sin(th),  r = sqrt(-2 log(max(u1, 1e-7))),  th = 2 pi u2.
// Element i of a tensor uses component (i & 3) of counter (i >> 2), so one Philox call feeds
// four consecutive elements and any backend regenerates eps from (seed, i) alone.
#pragma once

#include <cstdint>

#include "macros.h"
#include "math.h"

namespace robustmm {

struct Normal4 {
  float n0, n1, n2, n3;
};

RMM_HOST_DEVICE uint32_t mulhi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

RMM_HOST_DEVICE float uint_to_uniform(uint32_t x) {
  int32_t v = static_cast<int32_t>(x);
  v = v < 0 ? ~v : v;
  return static_cast<float>(v) * 4.6566127342e-10f;
}

RMM_HOST_DEVICE void box_muller(float u1, float u2, float* a, float* b) {
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  const float th = 6.283185307179586f * u2;
  const float r = sqrtf(-2.0f * log_f32(u1));
  float s, c;
  sincos_f32(th, &s, &c);
  *a = r * c;
  *b = r * s;
}

struct Uint4 {
  uint32_t c0, c1, c2, c3;
};

// Philox4x32-10 of the 64-bit counter (c0 = low half, c1 = high half, c2 = c3 = 0) under the
// 64-bit key `seed`, as Triton's randint4x.
RMM_HOST_DEVICE Uint4 philox4x32_10(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)  // nvcc, both passes (its host front end rejects the GCC pragma)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t prev0 = c0, prev2 = c2;
    c0 = mulhi_u32(0xCD9E8D57u, prev2) ^ c1 ^ k0;
    c2 = mulhi_u32(0xD2511F53u, prev0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * prev2;
    c3 = 0xD2511F53u * prev0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

RMM_HOST_DEVICE Normal4 randn4x(uint64_t seed, uint64_t counter) {
  const Uint4 c = philox4x32_10(seed, counter);
  Normal4 out;
  box_muller(uint_to_uniform(c.c0), uint_to_uniform(c.c1), &out.n0, &out.n1);
  box_muller(uint_to_uniform(c.c2), uint_to_uniform(c.c3), &out.n2, &out.n3);
  return out;
}

// Uniform in [0, 1) of flat element `index`: component (index & 3) of counter (index >> 2),
// as Triton's tl.rand4x (the dropout stream of masked_cross_attention).
RMM_HOST_DEVICE float rand_at(uint64_t seed, uint64_t index) {
  const Uint4 c = philox4x32_10(seed, index >> 2);
  const uint32_t k = static_cast<uint32_t>(index & 3u);
  return uint_to_uniform(k == 0 ? c.c0 : (k == 1 ? c.c1 : (k == 2 ? c.c2 : c.c3)));
}

// eps of flat element `index`: component (index & 3) of counter (index >> 2).
RMM_HOST_DEVICE float randn_at(uint64_t seed, uint64_t index) {
  const Normal4 n = randn4x(seed, index >> 2);
  const uint32_t k = static_cast<uint32_t>(index & 3u);
  return k == 0 ? n.n0 : (k == 1 ? n.n1 : (k == 2 ? n.n2 : n.n3));
}

}  // namespace robustmm
