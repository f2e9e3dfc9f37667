"""Tensor parallelism for the Wan denoiser (torch.distributed + DeepSpeed AutoTP).

``group``: a Denoiser replica as a TP group of Ray worker actors (it imports Ray only when a
group starts, so importing this package stays light); ``local``: the CLI's ``--tp N`` on a
private local Ray (import ``vidgen_serve.parallel.local`` directly).
"""

from . import group, tensor_parallel
from .group import *  # noqa: F401,F403 - the public names are each module's __all__
from .tensor_parallel import *  # noqa: F401,F403

__all__ = [*group.__all__, *tensor_parallel.__all__]
