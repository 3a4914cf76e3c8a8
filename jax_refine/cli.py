"""Command line of the CRM Refiner: refine one image/mask pair or a BIG-layout folder.

    jax-refine refine --checkpoint DIR --image IMG --mask MASK --out OUT.png [--gt GT]
    jax-refine refine --checkpoint DIR --input-dir IN --output-dir OUT [--skip-bad]

(`python -m jax_refine.cli` and `python -m jax_refine.refine` are the same command;
`jax-refine convert ...` is `python -m jax_refine.convert ...`.)

Compute: `--dtype` (float32, or bfloat16 for speed on accelerators; parameters stay float32)
and `--precision` (default: the platform's; "highest" for full float32 dots on GPUs/TPUs,
as the parity tests use). Compiled programs are kept in JAX's persistent compilation cache
(`--cache-dir`, default ~/.cache/jax_refine; `--no-cache`), so a second run on images of
the same shape buckets starts at once. Folder mode refines with `Refiner.refine_batch` in
groups of at most `GROUP_PIXELS` image pixels per local device (bounded host memory).

Everything is checked before the model is loaded: the checkpoint's config.json; every
input is read (see `jax_refine.io` for how 16-bit, palette and label files are interpreted);
image and mask sizes must agree; outputs must have an image extension, be writable and not
overwrite an input (unless `--overwrite`); scales must be finite and positive. Folder mode
reports every bad pair with its path and stops, or with `--skip-bad` refines the good pairs
and prints a summary of the skipped ones. Outputs are written atomically (temporary file +
rename); a failed single-pair run leaves no output behind. File names are matched literally
(no glob patterns). Outputs and metrics follow the reference's protocol (`jax_refine.io`):
the mask is 255 where floor(255 p) > 128, `--save-prob` PNGs hold floor(255 p), and
`--gt` / NAME_gt.* masks are scored with > 128.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jax_refine.io import (
    IMAGE_SUFFIXES,
    binarize_mask,
    files_by_stem,
    probability_to_uint8,
    read_image,
    read_mask,
    write_image,
)
from jax_refine.models import checkpoint_dir
from jax_refine.refine import (
    CONFIG_FORMAT,
    DEFAULT_SCALES,
    PRECISIONS,
    Refiner,
    enable_compilation_cache,
)

DEFAULT_CACHE_DIR = "~/.cache/jax_refine"
# Folder mode: image pixels per local device read and refined together (one refine_batch).
GROUP_PIXELS = 1 << 26


@dataclasses.dataclass(frozen=True)
class Job:
    """One image/mask pair to refine and where its outputs go."""

    name: str
    image: Path
    mask: Path
    gt: Path | None
    out: Path
    prob: Path | None  # the probability PNG (--save-prob)
    size: tuple[int, int] = (0, 0)  # (H, W), found while checking


class InputError(ValueError):
    """Problems found in the inputs before refining (one line per problem)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# ----------------------------------------------------------------------------- checks


def _positive_finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"scale {text} must be finite and positive")
    return value


def _file_ids(paths: Sequence[Path]) -> set[tuple[int, int]]:
    """(device, inode) of the existing files among `paths` (to recognise the same file under
    another name or through a link)."""
    ids = set()
    for path in paths:
        with contextlib.suppress(OSError):
            stat = path.stat()
            ids.add((stat.st_dev, stat.st_ino))
    return ids


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _output_problems(path: Path, inputs: set[tuple[int, int]], overwrite: bool) -> list[str]:
    """Why `path` cannot be written as an output (extension, writability, one of `inputs`,
    given as `_file_ids`)."""
    problems = []
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        problems.append(f"output {path}: unknown image extension {path.suffix!r} "
                        f"(use one of {', '.join(IMAGE_SUFFIXES)})")
    if not overwrite and _file_ids([path]) & inputs:
        problems.append(f"output {path} is one of the inputs (pass --overwrite to replace it)")
    if path.is_dir():
        problems.append(f"output {path} is a directory")
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        problems.append(f"output {path}: {ancestor} is not a directory")
    elif not os.access(ancestor, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        problems.append(f"output {path} is not writable")
    return problems


def _read_problems(job: Job) -> tuple[list[str], tuple[int, int]]:
    """Read the job's files -> (problems with their paths: unreadable files, size mismatches;
    the image size)."""
    problems, sizes = [], {}
    for kind, path, reader in (("image", job.image, read_image), ("mask", job.mask, read_mask),
                               ("ground truth", job.gt, read_mask)):
        if path is None:
            continue
        try:
            sizes[path] = reader(path).shape[:2]
        except ValueError as err:
            problems.append(str(err) if str(path) in str(err) else f"{kind} {path}: {err}")
    if len(set(sizes.values())) > 1:
        problems.append("sizes differ: " + ", ".join(f"{p} {h}x{w}" for p, (h, w) in
                                                     sizes.items()))
    return problems, sizes.get(job.image, (0, 0))


def _checked_job(job: Job, inputs: set[tuple[int, int]], overwrite: bool
                 ) -> tuple[Job, list[str]]:
    """(the job with its size, every problem of its inputs and of its outputs; `inputs`:
    `_file_ids` of every input file)."""
    problems, size = _read_problems(job)
    for path in (job.out, job.prob):
        if path is not None:
            problems += _output_problems(path, inputs, overwrite)
    return dataclasses.replace(job, size=size), problems


def _setup_problems(args: argparse.Namespace) -> list[str]:
    """Problems of the checkpoint's config.json and of the compilation cache folder."""
    problems = []
    try:
        checkpoint_dir.read_config(args.checkpoint, CONFIG_FORMAT)
    except (ValueError, OSError) as err:
        problems.append(f"--checkpoint: {err}")
    if args.no_cache:
        return problems
    directory = Path(args.cache_dir).expanduser()
    ancestor = _nearest_existing(directory)
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        problems.append(f"--cache-dir {directory}: cannot be created or written ({ancestor}); "
                        f"pass another folder or --no-cache")
    return problems


def plan(args: argparse.Namespace) -> tuple[list[Job], list[str]]:
    """(jobs whose inputs and outputs passed every check, problems of the others).

    Reads every input once (nothing is kept), so that a bad file is found before compute.
    """
    overwrite = args.overwrite
    if not args.input_dir:
        out = Path(args.out)
        prob = out.with_name(out.stem + "_prob.png") if args.save_prob else None
        job = Job(Path(args.image).stem, Path(args.image), Path(args.mask),
                  Path(args.gt) if args.gt else None, out, prob)
        job, problems = _checked_job(
            job, _file_ids([p for p in (job.image, job.mask, job.gt) if p]), overwrite)
        return ([], problems) if problems else ([job], [])

    in_dir, out_dir = Path(args.input_dir), Path(args.output_dir)
    if not in_dir.is_dir():
        return [], [f"input folder {in_dir} does not exist or is not a folder"]
    by_stem = files_by_stem(in_dir)
    inputs = _file_ids([p for paths in by_stem.values() for p in paths])
    jobs, problems = [], []
    for stem, paths in by_stem.items():
        if not stem.endswith("_im"):
            continue
        name = stem[: -len("_im")]
        image = next((p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES), paths[0])
        masks = by_stem.get(f"{name}_seg", [])
        gts = by_stem.get(f"{name}_gt", [])
        if not masks:
            problems.append(f"{image}: no coarse mask {name}_seg.* in {in_dir}")
            continue
        out = out_dir / f"{name}_refined.png"
        prob = out_dir / f"{name}_refined_prob.png" if args.save_prob else None
        job, found = _checked_job(Job(name, image, masks[0], gts[0] if gts else None, out,
                                      prob), inputs, overwrite)
        if found:
            problems += found
        else:
            jobs.append(job)
    if not jobs and not problems:
        problems.append(f"no NAME_im.* images in {in_dir}")
    return jobs, problems


# ----------------------------------------------------------------------------- refining


def _scores(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, float]:
    """(intersection, union, mBA) of one prediction: the reference protocol's per-image terms."""
    from jax_refine import metrics

    return (*metrics.intersection_union(pred, gt), metrics.boundary_accuracy(pred, gt))


def _summary(scores: list[tuple[int, int, float]]) -> tuple[float, float]:
    """Dataset IoU (sum of intersections / sum of unions) and mean mBA (NaNs skipped)."""
    inter, union = sum(s[0] for s in scores), sum(s[1] for s in scores)
    mbas = [s[2] for s in scores if not np.isnan(s[2])]
    return (inter / union if union else 1.0), (float(np.mean(mbas)) if mbas else float("nan"))


def _write_outputs(job: Job, prob: np.ndarray) -> np.ndarray:
    """Write the binary mask (and probability PNG); returns the binary mask. Writes both or
    neither: if the second write fails, the first output is removed.

    As the reference stores and scores predictions (`jax_refine.io`): the probability PNG is
    floor(255 p) (its `test.py` `_mask.png`), the binary mask 255 where floor(255 p) > 128
    (what its evaluation keeps of that PNG; its `_01mask.png` used p > 0.5 instead)."""
    quantised = probability_to_uint8(prob)
    refined = binarize_mask(quantised)
    job.out.parent.mkdir(parents=True, exist_ok=True)
    write_image(job.out, refined.astype(np.uint8) * 255)
    if job.prob is not None:
        try:
            write_image(job.prob, quantised)
        except BaseException:
            job.out.unlink(missing_ok=True)
            raise
    return refined


def _record(job: Job, coarse: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    """Write the job's outputs; its record, with IoU/mBA terms (printed) given a GT."""
    refined = _write_outputs(job, prob)
    record: dict[str, Any] = {"name": job.name, "output": str(job.out)}
    if job.gt is not None:
        gt = binarize_mask(read_mask(job.gt))
        record["before"] = _scores(binarize_mask(coarse), gt)
        record["after"] = _scores(refined, gt)
        (iou_0, mba_0), (iou_1, mba_1) = (_summary([record[k]]) for k in ("before", "after"))
        print(f"{job.name}: IoU {iou_0:.4f} -> {iou_1:.4f}, mBA {mba_0:.4f} -> {mba_1:.4f}")
    return record


def _groups(jobs: list[Job], budget: int) -> list[list[Job]]:
    """Jobs sorted by size (so that shape buckets batch together), cut into groups of at
    most `budget` image pixels (at least one job each)."""
    groups: list[list[Job]] = []
    total = budget
    for job in sorted(jobs, key=lambda j: j.size):
        pixels = job.size[0] * job.size[1]
        if total + pixels > budget:
            groups.append([])
            total = 0
        groups[-1].append(job)
        total += pixels
    return groups


def _refine_group(refiner: Refiner, group: list[Job], scales: tuple[float, ...],
                  skip: list[str] | None) -> list[dict[str, Any]]:
    """Read and refine one group with `refine_batch`. With `skip` (a list), a job that fails
    is appended to it and the others go on; without, the error propagates."""

    def failed(job: Job, err: Exception) -> None:
        if skip is None:
            raise err
        skip.append(f"{job.image}: {err}")

    pairs = []
    for job in group:
        try:
            pairs.append((job, read_image(job.image), read_mask(job.mask)))
        except ValueError as err:
            failed(job, err)
    if not pairs:
        return []
    try:
        probs = refiner.refine_batch([p[1] for p in pairs], [p[2] for p in pairs], scales)
    except ValueError:
        if skip is None:
            raise
        kept, probs = [], []  # find the culprit: one at a time
        for job, image, mask in pairs:
            try:
                probs.append(refiner.refine(image, mask, scales))
                kept.append((job, image, mask))
            except ValueError as err:
                failed(job, err)
        pairs = kept
    records = []
    for (job, _, coarse), prob in zip(pairs, probs, strict=True):
        try:
            records.append(_record(job, coarse, prob))
        except OSError as err:
            failed(job, err)
    return records


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Check every input and output, then refine; returns per-image records.

    Raises `InputError` listing every problem found (folder mode with --skip-bad: only when
    no pair is good; the skipped pairs are printed to stderr and recorded as
    {'skipped': reason}). Refined pairs are recorded as {'name', 'output'[, 'before',
    'after']} with the (intersection, union, mBA) terms when a ground truth is given.
    """
    setup = _setup_problems(args)
    jobs, problems = plan(args)
    if setup or (problems and not (args.input_dir and args.skip_bad and jobs)):
        raise InputError(setup + problems)
    scales = tuple(args.scales)
    if not args.no_cache:
        enable_compilation_cache(Path(args.cache_dir).expanduser())
    refiner = Refiner.from_checkpoint(args.checkpoint, dtype=args.dtype,
                                      precision=args.precision)
    skip = problems if args.input_dir and args.skip_bad else None

    from tqdm import tqdm

    done: list[dict[str, Any]] = []
    with tqdm(total=len(jobs), desc="refine", disable=len(jobs) == 1, file=sys.stderr) as bar:
        for group in _groups(jobs, GROUP_PIXELS * jax.local_device_count()):
            done += _refine_group(refiner, group, scales, skip)
            bar.update(len(group))
    order = {job.name: k for k, job in enumerate(jobs)}
    records = sorted(done, key=lambda r: order[r["name"]]) + [{"skipped": p} for p in problems]
    scored = [r for r in records if "after" in r]
    if len(scored) > 1:
        (iou_0, mba_0), (iou_1, mba_1) = (
            _summary([r[k] for r in scored]) for k in ("before", "after")
        )
        print(f"{len(scored)} images (dataset IoU, mean mBA): IoU {iou_0:.4f} -> {iou_1:.4f}, "
              f"mBA {mba_0:.4f} -> {mba_1:.4f}")
    if problems:
        print(f"refined {len(done)} pair(s); skipped {len(problems)} problem(s):",
              file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
    return records


def parse_args(argv: Sequence[str] | None = None,
               prog: str = "python -m jax_refine.cli") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Refine coarse masks with CRM (single pair or a BIG-layout folder).",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--image", help="input image (single-pair mode)")
    parser.add_argument("--mask", help="coarse mask (single-pair mode)")
    parser.add_argument("--out", help="output mask, e.g. out.png (single-pair mode)")
    parser.add_argument("--gt", help="ground-truth mask: print IoU/mBA before and after")
    parser.add_argument("--input-dir", help="folder with NAME_im.*, NAME_seg.* [NAME_gt.*]")
    parser.add_argument("--output-dir", help="where NAME_refined.png files are written")
    parser.add_argument("--skip-bad", action="store_true",
                        help="folder mode: refine the good pairs, list the bad ones at the end")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow an output to replace one of the input files")
    parser.add_argument("--save-prob", action="store_true",
                        help="also write 8-bit probability PNGs floor(255 p) (*_prob.png)")
    parser.add_argument("--scales", type=_positive_finite, nargs="+",
                        default=list(DEFAULT_SCALES),
                        help="multi-resolution schedule (default: 0.125 0.25 0.5 1.0)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype (parameters stay float32; default float32)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default=None,
                        help="float32 dot/convolution precision (default: the platform's; "
                             "GPUs use TF32, 'highest' is full float32)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                        help=f"persistent compilation cache (default {DEFAULT_CACHE_DIR})")
    parser.add_argument("--no-cache", action="store_true",
                        help="do not use the persistent compilation cache")
    args = parser.parse_args(argv)
    single = [args.image, args.mask, args.out]
    if args.input_dir or args.output_dir:
        if not (args.input_dir and args.output_dir) or any(single) or args.gt:
            parser.error("folder mode needs --input-dir and --output-dir (and no --image/"
                         "--mask/--out/--gt; ground truths are NAME_gt.* files)")
    elif not all(single):
        parser.error("give --image, --mask and --out, or --input-dir and --output-dir")
    elif args.skip_bad:
        parser.error("--skip-bad applies to folder mode only")
    return args


def main(argv: Sequence[str] | None = None, prog: str = "python -m jax_refine.cli") -> int:
    """Run the command line; returns the exit status (1 with a message on bad input)."""
    try:
        run(parse_args(argv, prog))
    except InputError as err:
        print(f"error: {len(err.problems)} problem(s) found before refining:", file=sys.stderr)
        for line in err.problems:
            print(f"  {line}", file=sys.stderr)
        if "--input-dir" in (argv or sys.argv):
            print("nothing was refined; --skip-bad refines the good pairs", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:  # bad checkpoint, unwritable output, full disk
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def console_main(argv: Sequence[str] | None = None) -> int:
    """The `jax-refine` command: subcommands `refine` (this module) and `convert`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"refine": "refine coarse masks with a CRM checkpoint",
                "convert": "official PyTorch checkpoint -> jax_refine checkpoint directory"}
    if not argv or argv[0] not in commands:
        usage = "\n".join(f"  {name:8s} {text}" for name, text in commands.items())
        print(f"usage: jax-refine {{refine,convert}} ...\n\ncommands:\n{usage}\n\n"
              f"`jax-refine COMMAND --help` describes each.",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "convert":
        from jax_refine.convert.__main__ import main as convert_main

        return convert_main(argv[1:], prog="jax-refine convert")
    return main(argv[1:], prog="jax-refine refine")


if __name__ == "__main__":
    sys.exit(main())
