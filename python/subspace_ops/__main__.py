"""``python -m subspace_ops bench ...``: the same CLI as the ``subspace-ops`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
