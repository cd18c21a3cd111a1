"""One rank of the distributed CLI tests: inference.py's main with the tiny pipeline already loaded as model "tiny"
(no transformers import in the ranks, see dist_rank.ByteLevelTokenizer).

`mlx.launch ... -- python tests/dist_cli.py TASK ARGS...` (TASK: the task whose pipeline is preloaded, e.g. t2i).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_rank import tiny_pipe  # noqa: E402

from lance_mlx import cmd_generate  # noqa: E402
from lance_mlx import distributed as D  # noqa: E402

if __name__ == "__main__":
    D._LOADED[D.load_key("tiny", sys.argv[1], "float32")] = tiny_pipe()
    sys.exit(cmd_generate.main(["--model", "tiny", "--dtype", "float32", *sys.argv[2:]]))
