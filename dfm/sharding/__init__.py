"""Scale-out: device meshes, logical-axis rules, sharded placement, multi-process launch.

- `mesh`: `MeshConfig(data=-1, fsdp=1, tensor=1)`, `make_mesh` (axes "data", "fsdp", "tensor",
  all `AxisType.Auto`).
- `rules`: the logical-axis table `DEFAULT_RULES` (MaxText style), `rules_from_table`,
  `logical_to_spec`, `use_rules` (mesh + rules context), `constrain` (activation constraint).
- `placement`: NNX state / batch placement (`shard_module`, `state_shardings`, `init_sharded`,
  `abstract_state`, `global_batch`).
- `distributed`: guarded `jax.distributed` initialization (`initialize`, `detect_cluster`,
  `is_main_process`).

Sharded training / evaluation steps live in `dfm.train` (`train(..., mesh=, rules=)`,
`dfm.train.steps`). See docs/scale_out.md.
"""
from dfm.sharding.distributed import ClusterSpec, detect_cluster, initialize, is_main_process
from dfm.sharding.mesh import MESH_AXES, MeshConfig, make_mesh
from dfm.sharding.placement import (abstract_state, batch_spec, global_batch, init_sharded, shard_module,
                                    state_shardings, variable_sharding)
from dfm.sharding.rules import (DEFAULT_RULES, Rules, constrain, logical_sharding, logical_to_spec,
                                rules_from_table, use_rules)

__all__ = ["ClusterSpec", "DEFAULT_RULES", "MESH_AXES", "MeshConfig", "Rules", "abstract_state", "batch_spec",
           "constrain", "detect_cluster", "global_batch", "init_sharded", "initialize", "is_main_process",
           "logical_sharding", "logical_to_spec", "make_mesh", "rules_from_table", "shard_module",
           "state_shardings", "use_rules", "variable_sharding"]
