"""Command line: convert an official PyTorch checkpoint into a jax_refine checkpoint directory.

    python -m jax_refine.convert crm CHECKPOINT.pth OUT_DIR

writes OUT_DIR/config.json and OUT_DIR/variables/ (the format documented in
`jax_refine.refine`), loadable with `Refiner.from_checkpoint(OUT_DIR)` and
`python -m jax_refine.refine --checkpoint OUT_DIR ...`. torch is imported only here, only
to read the .pth file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def load_torch_state_dict(path: str) -> dict:
    """A .pth file -> state_dict (a bare state_dict, or one under 'state_dict' / 'model')."""
    try:
        import torch
    except ImportError as err:  # torch is not a dependency of the library
        raise SystemExit("converting a .pth checkpoint needs PyTorch (pip install torch)") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise SystemExit(f"cannot read PyTorch checkpoint {path}: {err}") from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise SystemExit(f"{path} does not contain a state_dict (got {type(obj).__name__})")
    return obj


def convert_crm(checkpoint: str, out_dir: str) -> None:
    from jax_refine.convert.crm import crm_variables
    from jax_refine.models.crm import CRM
    from jax_refine.refine import save_checkpoint

    variables = crm_variables(load_torch_state_dict(checkpoint))
    path = save_checkpoint(out_dir, CRM(), variables)
    print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jax_refine.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="model", required=True)
    crm = sub.add_parser("crm", help="official CRM checkpoint -> checkpoint directory")
    crm.add_argument("checkpoint", help="the official .pth file (DataParallel keys are fine)")
    crm.add_argument("out_dir", help="output checkpoint directory")
    args = parser.parse_args(argv)
    from jax_refine.convert.common import KeyMismatchError

    try:
        if args.model == "crm":
            convert_crm(args.checkpoint, args.out_dir)
    except KeyMismatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
