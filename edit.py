"""Image and video editing with Lance on MLX (also the `lance-mlx-edit` command)."""

import sys

from lance_mlx.cmd_edit import main

if __name__ == "__main__":
    sys.exit(main())
