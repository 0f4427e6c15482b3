"""Convert a megavit/DeepSpeed checkpoint of any layout into one portable file.

    python tools/convert_checkpoint.py --input runs/vit_tiny/checkpoints --output runs/vit_tiny/consolidated
    convert-checkpoint --help                        (the same, as an installed console script)

The work is done by megavit.checkpoint.convert.
"""

import sys

from megavit.checkpoint.convert import main

if __name__ == "__main__":
    sys.exit(main())
