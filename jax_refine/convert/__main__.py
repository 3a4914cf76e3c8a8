"""Command line: convert an official PyTorch checkpoint into a jax_refine checkpoint directory.

    jax-refine convert crm CHECKPOINT.pth OUT_DIR        (= python -m jax_refine.convert ...)
    jax-refine convert pna CHECKPOINT.pth OUT_DIR [--pool-kernel-size 32 64]

Input files are never unpickled as arbitrary objects (`convert.common.read_checkpoint_file`:
.pth weights-only, detectron2 .pkl through a numpy-only unpickler); empty, HTML and text
files are named as such. Every converted tensor's shape is checked against the model before
anything is written (each mismatch names the key, the expected and the found shape). Both
write OUT_DIR/variables/ (orbax) first and OUT_DIR/config.json last, atomically. CRM: the format of
`jax_refine.refine`, loadable with `Refiner.from_checkpoint(OUT_DIR)` and
`python -m jax_refine.refine --checkpoint OUT_DIR ...`. PNA: the format of
`jax_refine.models.pna.save_checkpoint`, loadable with `models.pna.load_checkpoint(OUT_DIR)`,
by `evaluate.py --checkpoint` and as `init_from`. The PNA architecture is read off the
checkpoint (`convert.pna_config`: the detectron2 or the mmsegmentation layout, the latter
with its ResNetV1c backbone, mmseg PNA head and auxiliary head); output stride and
multi-grid follow the official variant of its coarse head (`models.pna.VARIANTS`); the
ASPP pooling kernel and the upsampling mode,
which the checkpoint does not store, come from the flags. torch is imported only to read the
.pth file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any


def _checked_variables(state_dict: dict[str, Any], checkpoint: str,
                       convert: Callable[[dict[str, Any]], dict[str, Any]],
                       init: Callable[[Any], dict[str, Any]], where: str) -> dict[str, Any]:
    """Convert `state_dict` (read from `checkpoint`) and check every tensor's shape against
    the model's (`init(rng)`, evaluated abstractly: nothing is computed)."""
    import jax

    from jax_refine.convert.common import check_shapes, recording_sources

    with recording_sources() as sources:
        variables = convert(state_dict)
    expected = jax.eval_shape(init, jax.random.PRNGKey(0))
    check_shapes(variables, {k: expected[k] for k in variables}, f"{where} {checkpoint}",
                 sources)
    return variables


def convert_crm(checkpoint: str, out_dir: str) -> None:
    """Official CRM .pth -> checkpoint directory of `jax_refine.refine` (default `CRM()`)."""
    import jax.numpy as jnp

    from jax_refine.convert.common import read_checkpoint_file
    from jax_refine.convert.crm import crm_variables
    from jax_refine.models.crm import CRM
    from jax_refine.refine import save_checkpoint

    model = CRM()
    image, mask, query = (jnp.zeros(s, jnp.float32)
                          for s in ((1, 32, 32, 3), (1, 32, 32, 1), (1, 4, 2)))
    variables = _checked_variables(
        read_checkpoint_file(checkpoint), checkpoint, crm_variables,
        lambda rng: model.init(rng, image, mask, query, query), "convert crm")
    path = save_checkpoint(out_dir, model, variables)
    print(f"wrote {path}")


def convert_pna(checkpoint: str, out_dir: str, settings: dict) -> None:
    """Official PNA checkpoint (detectron2 or mmseg layout) -> checkpoint dir of `models.pna`."""
    import jax.numpy as jnp

    from jax_refine.convert.common import read_checkpoint_file
    from jax_refine.convert.pna import pna_config, pna_variables
    from jax_refine.models import pna

    state_dict = read_checkpoint_file(checkpoint)
    kwargs = pna_config(state_dict)  # detectron2 or mmseg layout, read off the keys
    kwargs.update({k: v for k, v in settings.items() if v is not None})
    pna.build_pna(**kwargs)  # fails early on an inconsistent architecture
    # Parameter shapes do not depend on the pooling kernel, which must divide the input.
    shapes_model = pna.build_pna(**dict(kwargs, pool_kernel_size=None))
    image = jnp.zeros((1, 64, 64, 3), jnp.float32)
    variables = _checked_variables(state_dict, checkpoint, pna_variables,
                                   lambda rng: shapes_model.init(rng, image), "convert pna")
    path = pna.save_checkpoint(out_dir, kwargs, variables)
    print(f"wrote {path} ({', '.join(f'{k}={v}' for k, v in kwargs.items())})")


def main(argv: Sequence[str] | None = None, prog: str = "python -m jax_refine.convert") -> int:
    """Run the command line; returns the exit status (1 with a message on bad input)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="model", required=True)
    crm = sub.add_parser("crm", help="official CRM checkpoint -> checkpoint directory")
    crm.add_argument("checkpoint", help="the official .pth file (DataParallel keys are fine)")
    crm.add_argument("out_dir", help="output checkpoint directory")
    pna = sub.add_parser("pna", help="official PNA checkpoint (detectron2 or mmseg layout) -> "
                                     "checkpoint dir")
    pna.add_argument("checkpoint", help="the official .pth file")
    pna.add_argument("out_dir", help="output checkpoint directory")
    pna.add_argument("--upsample-mode", choices=["nearest", "bilinear"], default=None,
                     help="stage upsampling (default nearest; bilinear for Trans10k)")
    pna.add_argument("--pool-kernel-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                     help="DeepLabV3 ASPP image-pooling kernel (official Cityscapes: 32 64)")
    args = parser.parse_args(argv)
    from jax_refine.convert.common import KeyMismatchError

    try:
        if args.model == "crm":
            convert_crm(args.checkpoint, args.out_dir)
        else:
            pool = tuple(args.pool_kernel_size) if args.pool_kernel_size else None
            convert_pna(args.checkpoint, args.out_dir,
                        {"upsample_mode": args.upsample_mode, "pool_kernel_size": pool})
    except (KeyMismatchError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
