"""WebDataset shards: writing them (`seesay prepare --output-format shards`), reading
img2dataset-style shards (`seesay prepare --format webdataset --shards PATTERN`), and streaming
training batches from them. Layout and guarantees in docs/shards.md.

# b - images, r - caption rows, t - time
A sharded DATA_DIR is a prepared DATA_DIR whose manifest says ``"format": "shards"``: the train
split is a list of WebDataset tars (``manifest["shards"]["train"]``: url and usable sample count
per shard; relative urls are inside DATA_DIR), the other splits (val, test) are the ordinary
memory-mapped store next to it, and vocab.json / skipped.jsonl are as always. Samples a
preparation skipped (corrupt image, no caption) are listed in skipped.jsonl with their shard and
key, and the reader leaves them out, so sample ``j`` of a shard means its ``j``-th usable one.

Streaming order (`ShardStream`), per epoch, from (seed, epoch) only:

- the shards are permuted; rank r takes every world-th of them, its DataLoader worker w every
  W-th of those (with fewer shards than ranks x workers, every unit reads all shards and keeps
  every (ranks x workers)-th sample instead);
- every rank has the same number of batches, ceil(N / world) images (N train images); worker w
  makes batches w, w + W, ... (the order the DataLoader takes them in), cycling over its shards
  when they hold fewer samples, stopping early when they hold more;
- a unit's samples go through webdataset's shuffle buffer (`webdataset.filters.shuffle`, seeded).
  The buffer runs over sample positions (pass, shard, offset), which the manifest's counts give
  without reading anything, so the order of an epoch is known up front: the reader then streams
  the tars and emits the samples in that order, holding at most about a buffer's worth.

Resuming inside an epoch (`set_epoch(epoch, skip)`) is therefore exact: the unit recomputes its
order, drops the samples of the batches already trained, and starts reading at the shard and
offset of the first sample still to come (no earlier shard is opened, and no image is decoded
twice). Identical to an uninterrupted run, for any number of workers, as long as the world size,
workers, batch size and shard list are the same (the loop refuses a mid-epoch resume otherwise).
"""

from seesay.data.shards.common import (
    DEFAULT_BUFFER,
    DEFAULT_SHARD_SIZE,
    IMAGE_EXTENSIONS,
    decode_image,
    expand_shards,
    is_sharded,
    iter_shard,
    sample_captions,
)
from seesay.data.shards.stream import (
    ShardImages,
    ShardSplit,
    ShardStream,
    check_resume_workers,
    plan_epoch,
    shard_loader,
)
from seesay.data.shards.write import prepare_shards

__all__ = ["DEFAULT_BUFFER", "DEFAULT_SHARD_SIZE", "IMAGE_EXTENSIONS", "ShardImages", "ShardSplit", "ShardStream",
           "check_resume_workers", "decode_image", "expand_shards", "is_sharded", "iter_shard", "plan_epoch",
           "prepare_shards", "sample_captions", "shard_loader"]
