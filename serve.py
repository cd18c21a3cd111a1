"""A local OpenAI-compatible server for Lance on MLX (also the `lance-mlx-serve` command)."""

import sys

from lance_mlx.cmd_serve import main

if __name__ == "__main__":
    sys.exit(main())
