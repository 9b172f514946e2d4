"""Export a training checkpoint's trained weights (grouped form) to a .safetensors file, with the network's
config and class names in its metadata: the form to share, since loading it runs no code.

    python scripts/export_safetensors.py --checkpoint runs/r1 --out alexnet.safetensors
    python -c "import repro; net = repro.load_checkpoint('alexnet.safetensors')"
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from repro.cli import run  # noqa: E402
from repro.safetensors_io import export_safetensors  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a training checkpoint file, or a run folder (its latest.pt)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    args = p.parse_args(argv)
    return run(lambda: print(f"written: {export_safetensors(args.checkpoint, args.out)}", flush=True))


if __name__ == "__main__":
    sys.exit(main())
