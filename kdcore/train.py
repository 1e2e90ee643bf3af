"""``python -m kdcore.train``: the module torchrun launches; the options of ``kdcore train``.

    torchrun --nproc_per_node 2 -m kdcore.train --strategy kd+be+br+dl

The training loop itself is :mod:`kdcore.learning.train`.
"""

import sys

if __name__ == "__main__":
    from kdcore.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
