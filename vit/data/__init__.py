"""The training input pipeline: deterministic, elastic streaming over WebDataset tar shards.

    order.py     the order spec: which samples make up each global step (LanePlan), as arithmetic
                 on (seed, epoch, step): not on world size or workers
    dataset.py   what the pipeline reads from manifest.json (DatasetInfo, load_dataset_info)
    reading.py   samples out of shard segments (read_segment, iter_lane); tars are parsed by
                 shards.format.TarMembers
    samples.py   one sample: labels checked, image decoded and transformed (decode_sample)
    streams.py   TrainStream and EvalStream: the DataLoader workers, batches, corrupt samples;
                 to_device (uint8 batch -> normalised floats on the device)
    gpu.py       the GPU decode path (data.decode: gpu): JPEG bytes decoded and cropped on the device

The names below are the package's public interface; import them from ``vit.data``.
"""
from shards.format import TarMembers  # the tar reader lives with the shard format; kept importable here
from vit.data.dataset import DatasetInfo, ShardInfo, StreamError, load_dataset_info
from vit.data.order import LanePlan, Segment, slice_stream, window_order
from vit.data.reading import iter_lane, read_segment
from vit.data.samples import CorruptSample, LabelSpec, decode_sample, parse_labels, targets_tensor
from vit.data.streams import Batch, EvalStream, TrainStream, to_device

__all__ = ["Batch", "CorruptSample", "DatasetInfo", "EvalStream", "LabelSpec", "LanePlan", "Segment", "ShardInfo",
           "StreamError", "TarMembers", "TrainStream", "decode_sample", "iter_lane", "load_dataset_info",
           "parse_labels", "read_segment", "slice_stream", "targets_tensor", "to_device", "window_order"]
