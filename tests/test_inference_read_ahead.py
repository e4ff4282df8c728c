"""Reading the next image in a background thread while the detector works on this one
(rclip_core.inference.read_ahead, iterate_images' ``prefetch``): the same items in the same order, errors where
they were, an early stop that leaves no thread behind, and run_detection's records unchanged; and the
image-to-tensor copy the reader makes."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image
from torch import nn

from rclip_core.data.coco import DetectionDataset, ImageRecord
from rclip_core.errors import RclipError
from rclip_core.inference import read_ahead, run_detection


def _threads_alive() -> int:
    return sum(t.name.startswith("rclip-read-ahead") for t in threading.enumerate())


def test_read_ahead_yields_every_item_in_order():
    assert list(read_ahead(range(50))) == list(range(50))
    assert list(read_ahead([])) == []
    assert list(read_ahead([None, 0, ""])) == [None, 0, ""]  # falsy items are items, not the end


def test_the_next_item_is_fetched_while_the_consumer_holds_this_one():
    fetched = [threading.Event() for _ in range(3)]

    def source():
        for i in range(3):
            fetched[i].set()
            yield i

    gen = read_ahead(source())
    assert next(gen) == 0
    # Not a timing: the wait ends as soon as item 1 is fetched; without read-ahead it would never be (before the
    # consumer asks for it), and the generous limit only bounds how long a broken version hangs.
    assert fetched[1].wait(timeout=30)
    assert not fetched[2].is_set()  # one ahead, not more
    assert list(gen) == [1, 2]


def test_an_error_of_the_source_is_raised_where_its_item_would_have_been():
    def source():
        yield 0
        yield 1
        raise ValueError("image 2 is broken")

    got = []
    with pytest.raises(ValueError, match="image 2 is broken"):
        for item in read_ahead(source()):
            got.append(item)
    assert got == [0, 1]
    assert _threads_alive() == 0


def test_stopping_early_leaves_no_thread_and_fetches_at_most_one_more():
    fetched = []

    def source():
        for i in range(100):
            fetched.append(i)
            yield i

    gen = read_ahead(source())
    for item in gen:
        if item == 3:
            break
    gen.close()
    assert fetched[-1] <= 4
    assert _threads_alive() == 0


class _StubDetector(nn.Module):
    """Detections from the image's content (its mean colour per channel as a box), so records depend on the pixels
    each image brings, and on nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = type("C", (), {"num_classes": 2})()
        self.seen: list[int] = []

    def detect(self, batch):
        out = []
        for item in batch:
            self.seen.append(item["image_id"])
            m = item["image"].float().mean(dim=(1, 2))  # (3,)
            box = torch.stack([m[0], m[1], m[0] + m[2], m[1] + 7]).reshape(1, 4)
            out.append({"boxes": box, "scores": m[:1] / 255, "labels": torch.tensor([item["image_id"] % 2]),
                        "num_regions": 1})
        return out


def _dataset(tmp_path, n: int = 9, broken: tuple[int, ...] = (4,)) -> DetectionDataset:
    records = []
    for i in range(n):
        name = f"im{i}.png"
        if i in broken:
            (tmp_path / name).write_bytes(b"not an image")
        else:
            Image.new("RGB", (40 + 3 * i, 36), (10 * i, 255 - 9 * i, 5 * i + 1)).save(tmp_path / name)
        records.append(ImageRecord(id=100 + i, file_name=name, width=40 + 3 * i, height=36))
    return DetectionDataset(records, tmp_path, min_sizes=48, max_size=200)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_run_detection_gives_the_same_records_and_summary_with_and_without_read_ahead(tmp_path, batch_size):
    ds = _dataset(tmp_path)
    runs = []
    for prefetch in (True, False):
        det, progress = _StubDetector(), []
        results, summary = run_detection(det, ds, category_ids=[7, 9], batch_size=batch_size, prefetch=prefetch,
                                         progress=progress.append)
        runs.append((results, summary.images, summary.images_skipped, summary.detections, det.seen, progress))
    assert runs[0] == runs[1]
    assert runs[0][1] == 8 and len(runs[0][2]) == 1 and 104 not in runs[0][4]
    assert _threads_alive() == 0


def test_strict_raises_at_the_unreadable_image_with_read_ahead(tmp_path):
    det, progress = _StubDetector(), []
    with pytest.raises(RclipError, match="im4.png"):
        run_detection(det, _dataset(tmp_path), category_ids=[7, 9], strict=True, progress=progress.append)
    assert det.seen == [100, 101, 102, 103] and progress == [1, 2, 3, 4]
    assert _threads_alive() == 0


@pytest.mark.parametrize("prefetch", [True, False])
def test_run_detection_reads_the_next_image_while_detecting_this_one(tmp_path, prefetch):
    ds = _dataset(tmp_path, n=5, broken=())
    read = [threading.Event() for _ in range(len(ds))]
    readers = set()

    class Watched(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            item = ds[i]
            readers.add(threading.current_thread().name.startswith("rclip-read-ahead"))
            read[i].set()
            return item

    class Waiting(_StubDetector):
        def detect(self, batch):
            i = batch[0]["image_id"] - 100
            if not prefetch:  # read when needed
                assert i + 1 == len(ds) or not read[i + 1].is_set()
            else:  # the wait ends once image i + 1 is read (not a timing; the limit bounds a broken version's hang)
                assert i + 1 == len(ds) or read[i + 1].wait(timeout=30), f"image {i + 1} not read during image {i}"
            return super().detect(batch)

    results, summary = run_detection(Waiting(), Watched(), category_ids=[7, 9], prefetch=prefetch)
    assert summary.images == 5 and len(results) == 5
    assert readers == {prefetch}  # every image read in the background thread, or every one in the caller's


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (37, 23)])
def test_uint8_tensor_is_channels_first_contiguous_and_writable(size):
    import numpy as np

    from rclip_core.data.transforms import to_uint8_tensor

    w, h = size
    pixels = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    t = to_uint8_tensor(Image.fromarray(pixels))
    assert t.dtype == torch.uint8 and t.shape == (3, h, w) and t.is_contiguous()
    assert torch.equal(t, torch.from_numpy(pixels).permute(2, 0, 1))
    t[0, 0, 0] = 255 - t[0, 0, 0]  # its own memory: writing raises no error and leaves the image alone
    assert int(t[0, 0, 0]) != int(pixels[0, 0, 0])
