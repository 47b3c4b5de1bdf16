"""
Worker of the two-process `RetroMAELoss` test, launched by torchrun: on CPU (gloo), the
`SentenceTransformerTrainer` run of `helpers.train_with_retromae_loss` in full, then killed after its first
checkpoint and resumed; each process writes every weight it ends with (decoder and head included).

Usage: two_process_loss.py CHECKPOINT OUTPUT_DIR
"""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from helpers import train_with_retromae_loss


def weights(loss) -> dict:
    return {name: parameter.detach().clone().contiguous() for name, parameter in loss.retromae.named_parameters()}


if __name__ == "__main__":
    checkpoint, output_dir = Path(sys.argv[1]), Path(sys.argv[2])
    rank = os.environ["RANK"]
    whole = train_with_retromae_loss(checkpoint, output_dir / "whole", max_steps=4)
    train_with_retromae_loss(checkpoint, output_dir / "killed", max_steps=4, crash_at=2)
    resumed = train_with_retromae_loss(checkpoint, output_dir / "killed", max_steps=4, resume=True)
    save_file(weights(whole), output_dir / f"whole-{rank}.safetensors")
    save_file(weights(resumed), output_dir / f"resumed-{rank}.safetensors")
