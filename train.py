"""LoRA fine-tuning of Lance on MLX (also the `lance-mlx-train` command); see docs/training.md."""

import sys

from lance_mlx.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
