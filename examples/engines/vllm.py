"""Plan on a trace and write vLLM's EPLB arrays (physical_to_logical_map, logical_to_physical_map,
logical_replica_count per MoE layer); locus.vllm serves them through vLLM's policy interface."""

import os

import numpy as np

import locus
from common import arguments, load_trace
from locus.vllm import plan_policy

a = arguments(__doc__, layer_flags=False)  # vLLM's arrays have one row per MoE layer
trace = load_trace(a.trace)
train, _ = locus.split_by_request(trace, 0.5, 1)
plan = locus.plan(train, a.nodes, a.gpus_per_node, "locality", redundant_slots=1)
path = os.path.abspath(os.path.join(a.out, "vllm_eplb_state.json"))  # the engine reads it from its own folder
locus.export(plan, "vllm", path, load=locus.expert_load(train))
# What vLLM 0.19 and later receive when they ask the policy to rebalance (a torch tensor under vLLM;
# vLLM 0.13 to 0.18 get the three arrays).
policy = plan_policy(path)
slots = plan.ranks * plan.slots_per_rank
phy2log = policy.rebalance_experts(np.zeros((plan.layers, plan.experts)), slots, 1, a.nodes, plan.ranks)
assert phy2log.shape == (plan.layers, slots)
print(f"wrote {path}")
print(f"vllm flags: --enable-expert-parallel --enable-eplb --eplb-config "
      f"'{{\"num_redundant_experts\": {slots - plan.experts}}}' (expert-parallel size, data parallel x tensor parallel, {plan.ranks}); "
      f"in every worker process, from a vllm.general_plugins entry point: import locus.vllm; "
      f"locus.vllm.register('{path}')")
