#pragma once
//! @file
//! The runtime umbrella: what runs in a step on the host and needs no optional dependency (the
//! core types, the routers, the expert compute and the MoE layer). Planning (traces, groupers,
//! placements, cost models) is locus/planning.hpp; component headers (CUDA, MPI, NCCL, JSON I/O)
//! are included on their own.

#include <locus/core/bfloat16.hpp>
#include <locus/core/cancel.hpp>
#include <locus/core/config.hpp>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/extents.hpp>
#include <locus/core/moe_shape.hpp>
#include <locus/core/parallel_for.hpp>
#include <locus/core/policy.hpp>
#include <locus/core/routing.hpp>
#include <locus/core/topology.hpp>
#include <locus/core/version.hpp>
#include <locus/layer/expert_compute.hpp>
#include <locus/layer/moe_layer.hpp>
#include <locus/router/router.hpp>
