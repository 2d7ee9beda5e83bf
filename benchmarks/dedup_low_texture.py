"""Near-duplicate matching on distinct low-texture pictures: dHash alone against dHash + confirmation.

    .venv/bin/python benchmarks/dedup_low_texture.py [--threshold 6]

The pictures are `shards.testdata.LOW_TEXTURE` (skies, silhouettes, documents, plain colours cut
from the images that ship with scikit-image and scikit-learn), each distinct from the others.
Counts, for dHash alone (the rule before `same_picture`) and with the confirmation:
- pairs of distinct pictures matched as near duplicates;
- pictures `shard_dataset --exclude` would drop if the other pictures were the evaluation set;
- pictures `shard_dataset --dedup-within near` would drop (in name order, each against those before it);
- copies found (JPEG q90 / q50, half size JPEG / PNG): a copy is found when dHash is within the
  threshold (and, with the confirmation, `same_picture` agrees).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shards.dedup import HashIndex, same_picture  # noqa: E402
from shards.imaging import probe, thumbnail  # noqa: E402
from shards.testdata import encode, low_texture_images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threshold", type=int, default=6)
    args = parser.parse_args()
    images = low_texture_images()
    data = {name: encode(image, "PNG") for name, image in images.items()}
    hashes = {name: probe(d).dhash for name, d in data.items()}
    thumbs = {name: thumbnail(d) for name, d in data.items()}

    pairs = [(a, b) for a, b in itertools.combinations(sorted(data), 2)
             if (hashes[a] ^ hashes[b]).bit_count() <= args.threshold]
    confirmed = [(a, b) for a, b in pairs if same_picture(thumbs[a], thumbs[b])]

    dropped = {"dHash alone": 0, "dHash + confirmation": 0}
    for rule in dropped:
        index = HashIndex(args.threshold)
        for name in sorted(data):
            confirm = (lambda t: same_picture(thumbs[name], t)) if rule != "dHash alone" else None
            if index.find(hashes[name], confirm) is not None:
                dropped[rule] += 1
            else:
                index.add(hashes[name], name, payload=thumbs[name])

    found = {"dHash alone": 0, "dHash + confirmation": 0}
    total = 0
    for name, image in images.items():
        half = image.resize((image.width // 2, image.height // 2))
        for copy in (encode(image, "JPEG", quality=90), encode(image, "JPEG", quality=50),
                     encode(half, "JPEG", quality=75), encode(half, "PNG")):
            total += 1
            if (probe(copy).dhash ^ hashes[name]).bit_count() <= args.threshold:
                found["dHash alone"] += 1
                found["dHash + confirmation"] += same_picture(thumbnail(copy), thumbs[name])

    print(f"{len(data)} distinct low-texture pictures, dHash threshold {args.threshold}\n")
    print("| rule | distinct pairs matched | dropped by --exclude (the others) | dropped by --dedup-within near "
          "| copies found |")
    print("|---|---|---|---|---|")
    for rule, matched in (("dHash alone", pairs), ("dHash + confirmation", confirmed)):
        print(f"| {rule} | {len(matched)} of {len(data) * (len(data) - 1) // 2} | {len(set(itertools.chain(*matched)))} "
              f"of {len(data)} | {dropped[rule]} of {len(data)} | {found[rule]} of {total} |")


if __name__ == "__main__":
    main()
