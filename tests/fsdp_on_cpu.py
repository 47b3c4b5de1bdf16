"""
`retromae` run with accelerate's FSDP path opened to CPU processes, for the two-process FSDP test.

accelerate turns FSDP on only when its processes sit on GPUs or other accelerators; on CPU it
leaves the model to plain DDP. Everything below that choice (torch's `fully_shard` over gloo,
the Trainer's sharded checkpoints and their loading, the gathered state dict) runs on CPU, so this
launcher makes accelerate's state take the FSDP path when an FSDP plugin is given, as on GPUs,
and then runs the `retromae` command as it is.
"""

import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

from retromae.cli import main


accelerate_init = AcceleratorState.__init__


def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    accelerate_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin


AcceleratorState.__init__ = init_with_fsdp_on_cpu

if __name__ == "__main__":
    sys.exit(main())
