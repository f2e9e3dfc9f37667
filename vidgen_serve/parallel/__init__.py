"""Tensor parallelism for the Wan denoiser (torch.distributed + DeepSpeed AutoTP).

``group``: a Denoiser replica as a TP group of Ray worker actors (it imports Ray only when a
group starts, so importing this package stays light); ``local``: the CLI's ``--tp N`` on a
private local Ray (import ``vidgen_serve.parallel.local`` directly).
"""

from .group import (
    TensorParallelDenoiser,
    TensorParallelRun,
    TensorParallelWorker,
    placement_group_bundles,
    valid_tp_sizes,
    validate_tp,
)
from .tensor_parallel import (
    ROW_PARALLEL_LINEARS,
    DistributedRMSNorm,
    disable_unsupported_deepspeed_ops,
    find_free_port,
    init_tp_process_group,
    parameter_bytes,
    run_local_tp_group,
    shard_wan_transformer,
    sharded_forward_worker,
)

__all__ = [
    "TensorParallelDenoiser",
    "TensorParallelRun",
    "TensorParallelWorker",
    "placement_group_bundles",
    "valid_tp_sizes",
    "validate_tp",
    "ROW_PARALLEL_LINEARS",
    "DistributedRMSNorm",
    "disable_unsupported_deepspeed_ops",
    "find_free_port",
    "init_tp_process_group",
    "parameter_bytes",
    "run_local_tp_group",
    "shard_wan_transformer",
    "sharded_forward_worker",
]
