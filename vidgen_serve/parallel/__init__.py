"""The denoiser's worker group: tensor, Ulysses sequence and CFG parallelism for the Wan transformer.

By concern (docs/parallel.md):

* ``process_group``: the ``torch.distributed`` group (NCCL / gloo, registered with DeepSpeed)
  and its ``{tp, ulysses, cfg}`` sub-groups;
* the sharding plans: ``tensor_parallel`` (DeepSpeed AutoTP + the q/k norm over all heads),
  ``sequence_parallel`` (Ulysses with DeepSpeed's ``DistributedAttention``), ``cfg_parallel``
  (conditional / unconditional pass per rank set); ``transformer`` applies a layout's plans and
  loads each rank's slices of a checkpoint;
* ``worker``: one rank (a Ray actor in serving); ``group``: the front a Denoiser replica holds,
  which starts the ranks in a placement group and drives them (it imports Ray only when a group
  starts, so importing this package stays light); ``local``: the CLI's ``--parallel`` on a
  private local Ray (import ``vidgen_serve.parallel.local`` directly).
"""

from . import group, process_group, tensor_parallel
from .group import *  # noqa: F401,F403 - the public names are each module's __all__
from .process_group import *  # noqa: F401,F403
from .tensor_parallel import *  # noqa: F401,F403

__all__ = [*group.__all__, *process_group.__all__, *tensor_parallel.__all__]
