#pragma once
//! @file
//! `locus::bfloat16`: the 16-bit brain-float storage type, bit-compatible with CUDA's
//! `__nv_bfloat16`, usable on host and device. Arithmetic is done in float; conversion from
//! float rounds to nearest even and keeps NaN a (quiet) NaN, as the hardware does.

#include <cstdint>
#include <cstring>
#include <locus/core/config.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE {

struct bfloat16 {
  std::uint16_t bits = 0;

  bfloat16() = default;
  LOCUS_HOST_DEVICE explicit bfloat16(float f) : bits(from_float(f)) {}

  LOCUS_HOST_DEVICE explicit operator float() const { return to_float(bits); }

  //! The bfloat16 with exactly these bits.
  LOCUS_HOST_DEVICE static bfloat16 from_bits(std::uint16_t b) {
    bfloat16 r;
    r.bits = b;
    return r;
  }

  //! Float → bfloat16 bits, round to nearest, ties to even; NaN stays NaN.
  LOCUS_HOST_DEVICE static std::uint16_t from_float(float f) {
    std::uint32_t u = bit_cast_u32(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u); // quiet NaN
    const std::uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;
    return static_cast<std::uint16_t>(u >> 16);
  }

  //! bfloat16 bits → float (exact).
  LOCUS_HOST_DEVICE static float to_float(std::uint16_t b) { return bit_cast_f32(static_cast<std::uint32_t>(b) << 16); }

  LOCUS_HOST_DEVICE friend bool operator==(bfloat16 a, bfloat16 b) { return a.bits == b.bits; }

private:
  LOCUS_HOST_DEVICE static std::uint32_t bit_cast_u32(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
  }
  LOCUS_HOST_DEVICE static float bit_cast_f32(std::uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
};

static_assert(sizeof(bfloat16) == 2, "bfloat16 must be two bytes");

//! Float value of a float or a bfloat16, so templated code reads either element type.
LOCUS_HOST_DEVICE float to_float(float f) { return f; }
LOCUS_HOST_DEVICE float to_float(bfloat16 b) { return static_cast<float>(b); }

} // namespace locus::inline LOCUS_ABI_NAMESPACE
