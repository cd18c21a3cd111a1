"""Image and video understanding with Lance on MLX (also the `lance-mlx-caption` command)."""

import sys

from lance_mlx.cmd_caption import main

if __name__ == "__main__":
    sys.exit(main())
