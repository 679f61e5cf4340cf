#pragma once
//! @file
//! The planning umbrella: everything a deployment decides before its layers run, and needs no
//! optional dependency. Traces in and out, their statistics and synthesis; groupers (which rank
//! serves a request) and their fit on a trace; expert-map planners (where experts and replicas
//! live); the traffic and time models and the decode simulator that score a plan.
//! The runtime umbrella, locus/locus.hpp, includes none of these. JSON readers and writers
//! (trace/jsonl.hpp, *_json.hpp, placement/{engine_export,load_import}.hpp) are included on their
//! own.

#include <locus/cost/bounds.hpp>
#include <locus/cost/decode_simulator.hpp>
#include <locus/cost/online_replan.hpp>
#include <locus/cost/time_model.hpp>
#include <locus/cost/traffic.hpp>
#include <locus/grouper/baselines.hpp>
#include <locus/grouper/by_name.hpp>
#include <locus/grouper/grouper.hpp>
#include <locus/grouper/kmeans.hpp>
#include <locus/grouper/micro_batch.hpp>
#include <locus/grouper/workload_aware.hpp>
#include <locus/locus.hpp>
#include <locus/placement/activation_plan.hpp>
#include <locus/placement/activation_usage.hpp>
#include <locus/placement/by_name.hpp>
#include <locus/placement/eplb.hpp>
#include <locus/placement/linear.hpp>
#include <locus/placement/live_replan.hpp>
#include <locus/placement/locality.hpp>
#include <locus/placement/migration.hpp>
#include <locus/placement/plan_input.hpp>
#include <locus/placement/token_refine.hpp>
#include <locus/placement/trace_load.hpp>
#include <locus/trace/binary.hpp>
#include <locus/trace/esft.hpp>
#include <locus/trace/statistics.hpp>
#include <locus/trace/synthesizer.hpp>
#include <locus/trace/trace.hpp>
