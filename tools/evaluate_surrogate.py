"""Forecast skill of a trained ViT surrogate against persistence and the SQG model (da_plugin.surrogate_eval).

    python tools/evaluate_surrogate.py --checkpoint runs/vit_tiny/consolidated --shards data/sqg64_tiny \
        --starts 20 --steps 4 --output-dir runs/vit_tiny/eval
    evaluate-surrogate --help                        (the same, as an installed console script)

Guide: docs/surrogate_eval.md.
"""

import sys

from da_plugin.surrogate_eval import main

if __name__ == "__main__":
    sys.exit(main())
