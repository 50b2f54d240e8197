// Declares the vector variants of expf/logf/log1pf (and double) that glibc's libmvec provides on x86-64,
// so that GCC vectorises loops calling them without -ffast-math (glibc only declares them under
// __FAST_MATH__, which would also break the NaN checks of the statistics kernel). Needs -fno-math-errno.
#pragma once

#include <cmath>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)
#define ORCAL_SIMD_DECL __attribute__((simd("notinbranch")))
extern "C" {
float expf(float) noexcept ORCAL_SIMD_DECL;
float logf(float) noexcept ORCAL_SIMD_DECL;
double exp(double) noexcept ORCAL_SIMD_DECL;
double log(double) noexcept ORCAL_SIMD_DECL;
#if __GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35)
float log1pf(float) noexcept ORCAL_SIMD_DECL;
double log1p(double) noexcept ORCAL_SIMD_DECL;
#endif
}
#undef ORCAL_SIMD_DECL
#endif
