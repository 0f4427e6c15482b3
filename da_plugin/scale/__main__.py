"""``python -m da_plugin.scale CONFIG [key=value ...]``: the decomposed EnSF run (da_plugin.scale.run)."""

import sys

from da_plugin.scale.run import main

if __name__ == "__main__":
    sys.exit(main())
