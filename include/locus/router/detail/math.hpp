#pragma once
//! @file
//! The floating-point building blocks every router shares between host and device: rounded
//! arithmetic that the device compiler may not fuse, an exp / sigmoid built from those operations
//! only, and the total order used for selection.
//!
//! Why not std::exp / expf: the host C library and CUDA's expf differ in the last bit for some
//! inputs, and DeepSeek-style selection compares sigmoid(x) + bias across experts, so one ulp can
//! change which expert is chosen. Everything here is a sequence of correctly rounded IEEE
//! operations (+, -, *, /, exact scaling by a power of two), hence bit-identical on both sides.
//! On the device the operations are written as __fadd_rn / __fmul_rn / __fdiv_rn so that nvcc
//! never contracts them into FMAs; on the host they are plain operators, which x86-64 compilers
//! do not contract unless FMA code generation is enabled (-mfma, -march=haswell or later) — a host
//! build with FMA contraction stays correct but may pick a different expert on a one-ulp tie.

#include <cstdint>
#include <cstring>
#include <locus/core/bfloat16.hpp>
#include <locus/core/config.hpp>
#include <locus/core/rounded_float.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::detail::router {

// Correctly rounded operations, never contracted into FMAs (core/rounded_float.hpp).
using locus::detail::fadd;
using locus::detail::fdiv;
using locus::detail::fmul;
using locus::detail::fsub;

//! True for a finite float. Written as a comparison so that it vectorises on the host and needs
//! no library call on the device. The bound is FLT_MAX as a literal: numeric_limits' max() in device
//! code needs nvcc's --expt-relaxed-constexpr, and the SwiGLU activation brings this header to
//! programs that may not pass it.
LOCUS_HOST_DEVICE bool is_finite(float x) {
  const float a = x < 0.0f ? -x : x;
  return a <= 0x1.fffffep+127f;
}

LOCUS_HOST_DEVICE float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

LOCUS_HOST_DEVICE std::uint32_t float_to_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

//! `c ? a : b` through a bit mask. Written without a conditional so that the host compiler
//! neither turns it into a branch (jump threading would split the exp loop and stop it from
//! vectorising) nor changes the value (a min/max built from arithmetic would round).
LOCUS_HOST_DEVICE float select(bool c, float a, float b) {
  const std::uint32_t mask = 0u - static_cast<std::uint32_t>(c);
  return bits_to_float((float_to_bits(a) & mask) | (float_to_bits(b) & ~mask));
}

//! exp(x) for finite x, relative error below 3e-7 on [-87, 88]. Inputs are clamped to that range
//! (so exp never overflows; below it the result is 2^-126-ish instead of a denormal). So sigmoid
//! scores of logits below about -88 are all equal, where fp32 with denormals still orders them
//! down to about -103: routers then choose among such experts by id. No trained router's logits
//! come near (a reviewer's comparison with torch differed only there). Cody-Waite reduction x = n ln2 + r, |r| <=
//! ln2/2, then a degree-7 Taylor polynomial in Horner form, then an exact scaling by 2^n. NaN gives NaN (reduced as 0:
//! its conversion to an integer exponent would be undefined).
LOCUS_HOST_DEVICE float exp(float x) {
  const bool nan = !(x == x);
  const float in = x;
  x = select(nan, 0.0f, x);
  x = select(x < -87.0f, -87.0f, x);
  x = select(x > 88.0f, 88.0f, x);
  // round(x / ln2) by the 1.5 * 2^23 trick: exact for |x / ln2| < 2^22, no library call.
  const float shifter = 12582912.0f;
  const float n = fsub(fadd(fmul(x, 1.44269504088896341f), shifter), shifter);
  // ln2 split so that n * ln2_hi is exact for |n| <= 128.
  const float ln2_hi = 0.693145751953125f;
  const float ln2_lo = 1.428606765330187045e-06f;
  float r = fsub(x, fmul(n, ln2_hi));
  r = fsub(r, fmul(n, ln2_lo));
  float p = 1.0f / 5040.0f;
  p = fadd(fmul(p, r), 1.0f / 720.0f);
  p = fadd(fmul(p, r), 1.0f / 120.0f);
  p = fadd(fmul(p, r), 1.0f / 24.0f);
  p = fadd(fmul(p, r), 1.0f / 6.0f);
  p = fadd(fmul(p, r), 0.5f);
  p = fadd(fmul(p, r), 1.0f);
  p = fadd(fmul(p, r), 1.0f);
  const auto e = static_cast<std::int32_t>(n) + 127;
  return select(nan, in, fmul(p, bits_to_float(static_cast<std::uint32_t>(e) << 23)));
}

//! The logistic function 1 / (1 + exp(-x)) for finite x.
LOCUS_HOST_DEVICE float sigmoid(float x) { return fdiv(1.0f, fadd(1.0f, exp(-x))); }

//! The selection order of every router: a higher score first, and on equal scores the lower id.
//! A strict total order on (score, id) pairs, so any reduction order (a sequential scan on the
//! host, a butterfly across a warp) picks the same winner.
LOCUS_HOST_DEVICE bool better(float va, int ia, float vb, int ib) { return va > vb || (va == vb && ia < ib); }

//! The value part of `better` as an unsigned key, for selections that reduce one 32-bit word
//! (a warp's max reduction): key(a) > key(b) exactly when a > b for non-NaN floats, and -0 and +0
//! share a key (they compare equal). Every float, -inf included, keys above 0, which is left free
//! to mark "not a candidate".
LOCUS_HOST_DEVICE std::uint32_t order_key(float v) {
  const std::uint32_t u = float_to_bits(fadd(v, 0.0f)); // -0 + 0 = +0
  return (u & 0x80000000u) != 0 ? ~u : (u | 0x80000000u);
}

//! The float whose order_key is `k` (+0 for the key of ±0).
LOCUS_HOST_DEVICE float key_value(std::uint32_t k) {
  return bits_to_float((k & 0x80000000u) != 0 ? (k & 0x7fffffffu) : ~k);
}

//! Adds `x` to the two largest values seen so far (m1 >= m2, counted with multiplicity, as the
//! host's top2_sum counts them). For values that are not NaN.
LOCUS_HOST_DEVICE void top2_push(float& m1, float& m2, float x) {
  const float low = x < m1 ? x : m1;
  m2 = low > m2 ? low : m2;
  m1 = x > m1 ? x : m1;
}

//! The two largest of (m1, m2) and (o1, o2), each a top2_push result: how a group's lanes combine
//! their pairs.
LOCUS_HOST_DEVICE void top2_merge(float& m1, float& m2, float o1, float o2) {
  const float low = o1 < m1 ? o1 : m1, rest = o2 > m2 ? o2 : m2;
  m2 = low > rest ? low : rest;
  m1 = o1 > m1 ? o1 : m1;
}

//! A router input element as float (fp32 or bfloat16 logits).
LOCUS_HOST_DEVICE float load_logit(const float* p) { return *p; }
LOCUS_HOST_DEVICE float load_logit(const bfloat16* p) { return bfloat16::to_float(p->bits); }

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail::router
