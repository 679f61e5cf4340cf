"""Plan on a trace and write TensorRT-LLM's moe_load_balancer YAML (num_slots and
initial_global_assignments keyed by the model's layer index)."""

import os

import locus
from common import arguments, load_trace

a = arguments(__doc__)
trace = load_trace(a.trace)
train, _ = locus.split_by_request(trace, 0.5, 1)
plan = locus.plan(train, a.nodes, a.gpus_per_node, "locality", redundant_slots=1)
path = os.path.abspath(os.path.join(a.out, "moe_load_balancer.yaml"))  # the engine reads it from its own folder
locus.export(plan, "trtllm", path, first_moe_layer=a.first_moe_layer, moe_layer_step=a.moe_layer_step,
             num_hidden_layers=a.num_hidden_layers, mtp_layers=a.mtp_layers,
             load=locus.expert_load(train))
print(f"wrote {path}")
print(f"trtllm: put 'enable_attention_dp: true' and 'moe_config: {{backend: WIDEEP, load_balancer: {path}}}' in the "
      f"--extra_llm_api_options YAML (TensorRT-LLM's load balancer needs attention DP, EP > 1 and a backend that "
      f"supports it); run with --tp_size {plan.ranks} --ep_size {plan.ranks} (trtllm-serve)")
