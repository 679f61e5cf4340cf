#pragma once
//! @file
//! Correctly rounded float +, -, *, / that give the same bits on the host and the device: on the
//! device they are __fadd_rn / __fsub_rn / __fmul_rn / __fdiv_rn, which nvcc never contracts into
//! an FMA; on the host they are the plain operators, which x86-64 compilers do not contract unless
//! FMA code generation is enabled (-mfma, -march=haswell or later). The routers' selection and the
//! row reductions' sums are built from these, so a CPU test checks the device's bits.

#include <locus/core/config.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::detail {

LOCUS_HOST_DEVICE float fadd(float a, float b) {
#if LOCUS_IS_DEVICE_PASS()
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
LOCUS_HOST_DEVICE float fsub(float a, float b) {
#if LOCUS_IS_DEVICE_PASS()
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
LOCUS_HOST_DEVICE float fmul(float a, float b) {
#if LOCUS_IS_DEVICE_PASS()
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
LOCUS_HOST_DEVICE float fdiv(float a, float b) {
#if LOCUS_IS_DEVICE_PASS()
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail
