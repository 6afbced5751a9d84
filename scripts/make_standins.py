"""Write stand-in checkpoints (published shapes, seeded random weights; for time and memory, never accuracy).

    python scripts/make_standins.py llama-3.2-1b llama-3-8b moe-small        # into $ANY4_DATA/models/<name>-standin
    python scripts/make_standins.py llama-3-8b --out /tmp/models --seed 1

Each folder then loads by name: any4lib.load_model("llama-3-8b-standin"). Llama-3-70B (140 GB) and Mixtral-8x7B
(93 GB) are written only where the disk holds them; elsewhere any4lib.standins.StandinWeights generates them one
decoder layer at a time. A folder already holding the same stand-in is kept.
"""

from __future__ import annotations

import argparse
import time

from any4lib.paths import data_root
from any4lib.standins import STANDINS, write_standin


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", choices=sorted(STANDINS))
    parser.add_argument("--out", default=None, help="parent folder (default: $ANY4_DATA/models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or model name (default: ref-en-16m)")
    args = parser.parse_args(argv)
    parent = data_root() / "models" if args.out is None else args.out
    for name in args.names:
        start = time.perf_counter()
        folder = write_standin(name, f"{parent}/{name}-standin", args.tokenizer, seed=args.seed)
        print(f"{folder} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
