"""`vitpipe inspect CHECKPOINT_OR_RUN --out DIR`: Figures 6 and 7 of the ViT paper + curves, as one HTML report."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="draw the ViT paper's Fig 6/7 (filters, pos-embed similarity, attention distance, rollout) + curves",
        description="Load a run folder or checkpoint (run URL, model.safetensors dir, timm .pth/.safetensors, "
        "big_vision .npz), draw the figures on real photographs (scikit-image's, or --images) and write "
        "PNGs + one self-contained report.html.",
    )
    p.add_argument("source", metavar="CHECKPOINT_OR_RUN", help="run folder (local or s3://) or checkpoint file")
    p.add_argument("--out", default=None, help="output folder (local or s3://); default: <run>/report for a run")
    p.add_argument("--images", default=None, help="folder of photographs to use (default: scikit-image's bundled ones)")
    p.add_argument("--compare", default=None, help="another run/checkpoint whose position embeddings to show beside")
    p.add_argument("--num-pcs", type=int, default=28, help="principal components of the patch filters to draw (paper: 28)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.stages import inspect_stage

    result = inspect_stage(args.source, out=args.out, images=args.images, compare=args.compare, num_pcs=args.num_pcs)
    print(result["markdown"])
    print(f"wrote {result['html']} and {len(result['pngs'])} PNGs")
    return 0
