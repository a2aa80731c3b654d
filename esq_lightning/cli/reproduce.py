"""esq-reproduce: the whole paper pipeline at scale=digits|cifar (see esq_lightning/reproduce.py)."""

from __future__ import annotations

import sys


def main() -> int:
    from esq_lightning.reproduce import main as run

    return run(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
