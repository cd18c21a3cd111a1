"""Convert the upstream Lance checkpoint to one MLX folder (also the `lance-mlx-convert` command)."""

import sys

from lance_mlx.cmd_convert import main

if __name__ == "__main__":
    sys.exit(main())
