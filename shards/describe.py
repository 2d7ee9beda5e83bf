"""A dataset describes itself to other readers, beside ``manifest.json``:

- ``_info.json`` for timm's WebDataset reader (``timm/data/readers/reader_wds.py``):
  ``{"name", "splits": {SPLIT: {"name", "num_samples", "filenames", "shard_lengths"}}}``, with
  SPLIT = the dataset's name (``vitpipe shard --name``), so
  ``timm.data.create_dataset('wds/<name>', root=<dataset>, split='<name>')`` reads it; ``classes``
  (index = label id) is there too for anyone who reads the file;
- ``README.md``, a Hugging Face dataset card whose YAML header declares the split's tar files
  and the features, with ``cls`` a ``ClassLabel`` carrying the class names, so
  ``datasets.load_dataset(<dataset folder>)`` gives named labels. (``load_dataset("webdataset",
  data_files=...)`` does not read the card; there, and for stock ``webdataset``, each sample's
  ``.json`` member carries its class names in ``classes``.)

Both are written before ``manifest.json``, which stays the last write of a dataset.
"""
from __future__ import annotations

import json

from shards import storage

INFO = "_info.json"
CARD = "README.md"
_META_FEATURES = [  # the .json member the writer puts in every sample (docs/interfaces.md)
    {"name": "classes", "list": "string"}, {"name": "height", "dtype": "int64"},
    {"name": "labels", "list": "int64"}, {"name": "path", "dtype": "string"}, {"name": "width", "dtype": "int64"},
]


def timm_info(manifest: dict) -> dict:
    """timm's ``_info.json`` for the dataset described by ``manifest``."""
    split = manifest["name"]
    shards = manifest["shards"]
    return {
        "name": split,
        "splits": {split: {"name": split, "num_samples": sum(s["samples"] for s in shards),
                           "filenames": [s["name"] for s in shards],
                           "shard_lengths": [s["samples"] for s in shards]}},
        "classes": list(manifest["classes"]),
    }


def _yaml_str(s: str) -> str:
    return json.dumps(str(s))  # a JSON string is a valid YAML double-quoted scalar


def dataset_card(manifest: dict, *, image_exts: list[str]) -> str:
    """A Hugging Face dataset card (YAML header + a line of text) for a dataset this project wrote."""
    name = manifest["name"]
    lines = ["---", "configs:", "- config_name: default", "  data_files:", f"  - split: {_yaml_str(name)}",
             f"    path: {_yaml_str(name + '-*.tar')}", "dataset_info:", "  features:"]
    lines += [f"  - name: {ext}\n    dtype: image" for ext in sorted(image_exts)]
    if not manifest.get("multi_label"):
        lines += ["  - name: cls", "    dtype:", "      class_label:", "        names:"]
        lines += [f"          {_yaml_str(str(i))}: {_yaml_str(c)}" for i, c in enumerate(manifest["classes"])]
    lines += ["  - name: json", "    struct:"]
    for f in _META_FEATURES:
        kind, value = next((k, v) for k, v in f.items() if k != "name")
        lines += [f"    - name: {f['name']}", f"      {kind}: {value}"]
    lines += ["  - name: __key__", "    dtype: string", "  - name: __url__", "    dtype: string", "---",
              f"# {name}", "",
              f"WebDataset shards written by vitpipe: {manifest['num_samples']} samples in {manifest['num_shards']} "
              f"shards, {len(manifest['classes'])} classes. `manifest.json` lists every shard (sha256), the class "
              "index and every record skipped.", ""]
    return "\n".join(lines)


def write_reader_info(dataset_url: str, manifest: dict, *, image_exts: list[str] | None = None) -> None:
    """Write ``_info.json`` (timm) and, when ``image_exts`` is known, ``README.md`` (Hugging Face)."""
    storage.write_json(storage.join(dataset_url, INFO), timm_info(manifest))
    if image_exts:
        storage.write_bytes(storage.join(dataset_url, CARD), dataset_card(manifest, image_exts=image_exts).encode())


def reader_urls(dataset_url: str, *, expires: int = 3600) -> list[str]:
    """URLs of the dataset's shards that stock readers open without this project: local paths, or
    for ``s3://`` presigned ``https://`` GET URLs valid ``expires`` seconds (webdataset opens them
    with curl; no credentials or AWS CLI needed on the reading side)."""
    from shards.reader import shard_urls

    return [storage.presigned_url(url, expires=expires) for url in shard_urls(dataset_url)]
