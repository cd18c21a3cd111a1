"""Text-to-image, text-to-video and image-to-video with Lance on MLX (also the `lance-mlx-generate` command)."""

import sys

from lance_mlx.cmd_generate import main
from lance_mlx.config import LanceConfig, build_lance_config  # noqa: F401  (seed API: importable from here)

if __name__ == "__main__":
    sys.exit(main())
