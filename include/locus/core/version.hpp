#pragma once
//! @file
//! Library version. CMake reads the three numbers from this file.

#define LOCUS_VERSION_MAJOR 0
#define LOCUS_VERSION_MINOR 1
#define LOCUS_VERSION_PATCH 0

//! Single integer for comparisons: MAJOR * 10000 + MINOR * 100 + PATCH.
#define LOCUS_VERSION (LOCUS_VERSION_MAJOR * 10000 + LOCUS_VERSION_MINOR * 100 + LOCUS_VERSION_PATCH)

//! Every public name lives in `locus::LOCUS_ABI_NAMESPACE`, an inline namespace, so that two
//! incompatible versions linked into one program do not silently violate the one-definition rule.
#define LOCUS_ABI_NAMESPACE v0_1
