"""Plan on a trace with locus's locality planner and write SGLang's --init-expert-location file
(one physical_to_logical_map row per hidden layer; empty replica slots filled)."""

import os

import locus
from common import arguments, load_trace

a = arguments(__doc__)
trace = load_trace(a.trace)
train, test = locus.split_by_request(trace, 0.5, 1)
plan = locus.plan(train, a.nodes, a.gpus_per_node, "locality", redundant_slots=1)
path = os.path.abspath(os.path.join(a.out, "sglang_expert_location.json"))  # the engine reads it from its own folder
locus.export(plan, "sglang", path, first_moe_layer=a.first_moe_layer, moe_layer_step=a.moe_layer_step,
             num_hidden_layers=a.num_hidden_layers, mtp_layers=a.mtp_layers,
             load=locus.expert_load(train))
redundant = plan.ranks * plan.slots_per_rank - plan.experts
print(f"wrote {path}")
print(f"sglang flags: --init-expert-location {path} --ep-num-redundant-experts {redundant} --tp-size {plan.ranks} "
      f"--ep-size {plan.ranks}")
