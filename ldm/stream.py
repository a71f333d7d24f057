"""data.streaming: data.path read as a `datasets` streaming source, `load_dataset(data.path, split="train",
streaming=True)`: a local folder of parquet, webdataset .tar or imagefolder files (or a Hub name where the Hub is
reachable), never downloaded whole nor listed into memory.

The stream is `split_dataset_by_node` for this process (whole files per process when their count divides by the
process count, else every world-th row), shuffled in a buffer of data.shuffle_buffer rows seeded (seed, epoch), epoch
after epoch without end (max_steps ends the run), in batches of the process's consecutive usable rows. A row whose
image does not decode, or that has no caption, is skipped and counted with its reason. Each sample's random choices
come from its stream position's seed, as in ldm.shards. Resume replays the stream up to the checkpoint's position
(reading the rows before it again): exact, where `IterableDataset.state_dict()` would lose the shuffle buffer's
rows. Unlike webdataset shards (ldm.shards) nothing is indexed first, so the processes' epochs drift apart when their
splits differ in size: within an epoch no row goes to two processes, but a process that reaches its split's end
starts its next epoch while the others finish theirs; DataLoader workers each read the whole split and keep every
workers-th batch. Square data.resolution only (no data.buckets).
"""

from __future__ import annotations

import random

from torch.utils.data import IterableDataset, get_worker_info

from ldm.buckets import fit
from ldm.data import DataError, choose, collate, open_rgb, sample_seed, unreadable


class Stream(IterableDataset):
    """The endless stream of this process's collated batches of {"pixels", "caption", "seed", "key", "size",
    "original_size", "crop", "skipped"} from stream position `start` (samples drawn by all processes so far)."""

    def __init__(self, data, batch_size: int, rank: int, world: int, seed: int, start: int = 0):
        self.data, self.batch_size, self.rank, self.world, self.seed, self.start = (
            data,
            batch_size,
            rank,
            world,
            seed,
            start,
        )
        self.skipped = []

    def rows(self, epoch: int):
        """This process's split of data.path in epoch `epoch`'s shuffled order, images undecoded."""
        from datasets import Image, load_dataset
        from datasets.distributed import split_dataset_by_node

        try:
            ds = load_dataset(self.data.path, split="train", streaming=True)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"data.path {self.data.path} is not a datasets streaming source: {e}") from None
        if self.data.image_column not in (ds.column_names or [self.data.image_column]):
            raise DataError(f"no column '{self.data.image_column}' in {self.data.path}: set data.image_column")
        ds = ds.cast_column(self.data.image_column, Image(decode=False))
        ds = split_dataset_by_node(ds, self.rank, self.world)
        ds = ds.shuffle(seed=self.seed, buffer_size=self.data.shuffle_buffer)
        ds.set_epoch(epoch)
        return ds

    def samples(self):
        """(key, image, caption, skipped) of this process's usable rows, epoch after epoch."""
        epoch, skipped = 0, []
        while True:
            found = False
            for n, row in enumerate(self.rows(epoch)):
                key = str(row.get("__key__", f"{self.rank}/{n}"))
                caption = row.get(self.data.caption_column)
                if not isinstance(caption, str) or not caption:
                    skipped.append((key, "no caption"))
                    continue
                image = row[self.data.image_column]
                try:
                    img = open_rgb(image["bytes"] if image.get("bytes") else image["path"])
                except Exception as e:  # a corrupt image can raise almost anything inside a decoder
                    skipped.append((key, unreadable(e)))
                    continue
                found = True
                yield key, img, caption, skipped
                skipped = []
            if not found:
                raise DataError(f"process {self.rank}'s split of {self.data.path} holds no usable rows")
            epoch += 1

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        global_batch, size = self.world * self.batch_size, (self.data.resolution,) * 2
        step, batch = self.start // global_batch, []
        replay = step * self.batch_size  # resume: this process's samples before the checkpoint's position
        for key, img, caption, skipped in self.samples():
            if replay:
                replay -= 1
                continue
            if step % workers == worker:
                seed = sample_seed(self.seed, step * global_batch + self.rank * self.batch_size + len(batch))
                rng = random.Random(seed)
                _, flip = choose(rng, 1, self.data.random_flip)
                pixels, crop = fit(img, size, self.data.center_crop, flip, rng)
                batch.append(
                    {"pixels": pixels, "caption": caption, "seed": seed, "key": key, "skipped": skipped}
                    | {"size": size, "original_size": img.size, "crop": crop}
                )
            else:
                batch.append(None)
            if len(batch) == self.batch_size:
                if step % workers == worker:
                    yield collate(batch)
                step, batch = step + 1, []
