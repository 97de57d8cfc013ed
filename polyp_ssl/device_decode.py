"""`--decode_on device`: loader workers ship a batch's JPEG bytes and crop windows; the training
process decodes them where it trains (nvJPEG on a GPU) and makes the anchor crops there.

A worker then only reads shards and draws bags, so a few CPU cores feed a fast GPU. The result
equals the workers' own decoding (`polyp_ssl.transforms.anchor_crop`) within one grey level:
the same windows, the same antialiased bilinear resize, the same flips.

Encoded batch keys (everything else as in a decoded batch):
    jpeg_data     uint8 [total bytes]: the batch's distinct JPEGs, concatenated
    jpeg_offsets  int64 [M + 1]: JPEG m is jpeg_data[offsets[m]:offsets[m + 1]]
    jpeg_names    list of M "shard: sample key: frame i" strings, for error messages
    frame_jpeg    int64 [B, S]: which JPEG each frame of each row is
    frame_window  int64 [B, S, 4]: the anchor crop's [x0, y0, x1, y1) in that JPEG
    flips         bool [B, 2]: horizontal, vertical flip of each row
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torchvision.io

from polyp_ssl.shards.sample import JpegSizeError, check_jpeg

# the padded uint8 canvas of one batch's decoded JPEGs (480 stored crops of 1024 x 1024 are 1.5 GB)
MAX_CANVAS_BYTES = 2 << 30
ENCODED_KEYS = ("jpeg_data", "jpeg_offsets", "jpeg_names", "frame_jpeg", "frame_window", "flips")


class FrameDecodeError(RuntimeError):
    """A JPEG of an encoded batch does not decode; the message names shard, sample and frame."""


def pack_jpegs(jpegs: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """One uint8 tensor of all JPEGs plus offsets: two tensors to pass between processes instead
    of one per JPEG (each tensor crossing a worker queue costs a shared-memory handle)."""
    sizes = torch.tensor([0, *map(len, jpegs)], dtype=torch.int64)
    offsets = torch.cumsum(sizes, 0)
    data = (
        torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8)
        if jpegs
        else torch.empty(0, dtype=torch.uint8)
    )
    return data, offsets


def is_encoded(batch: Any) -> bool:
    return isinstance(batch, dict) and "jpeg_data" in batch


def decode_jpegs(batch: dict[str, Any], device: torch.device | str) -> list[torch.Tensor]:
    """The batch's JPEGs as uint8 [3, h, w] tensors on `device`, decoded there in one call."""
    data, offsets = batch["jpeg_data"], batch["jpeg_offsets"].tolist()
    if data.device.type != "cpu":
        raise ValueError("an encoded batch must be decoded before it is moved to the device")
    check_jpeg_sizes(data, offsets, batch["jpeg_names"])
    chunks = [data[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    mode = torchvision.io.ImageReadMode.RGB
    try:
        return torchvision.io.decode_jpeg(chunks, mode=mode, device=device)
    except RuntimeError:
        # name the first JPEG that fails (the batched call does not say which)
        for name, chunk in zip(batch["jpeg_names"], chunks, strict=True):
            try:
                torchvision.io.decode_jpeg(chunk, mode=mode)
            except RuntimeError as exc:
                raise FrameDecodeError(f"{name} does not decode ({exc}) [corrupt_jpeg]") from exc
        raise


def check_jpeg_sizes(data: torch.Tensor, offsets: list[int], names: Sequence[str]) -> list[tuple[int, int]]:
    """(w, h) of each JPEG of an encoded batch from its header, before anything is decoded: each
    within shards.sample.MAX_FRAME_PIXELS, and the padded canvas crop_resize_all makes for them
    (JPEGs x 3 x tallest x widest) within MAX_CANVAS_BYTES; FrameDecodeError names the JPEG."""
    view = memoryview(data.numpy())
    sizes = []
    for name, a, b in zip(names, offsets[:-1], offsets[1:], strict=True):
        try:
            sizes.append(check_jpeg(view[a:b]))
        except JpegSizeError as exc:
            raise FrameDecodeError(f"{name} does not decode ({exc}) [corrupt_jpeg]") from None
    if sizes:
        w_max, h_max = max(w for w, _ in sizes), max(h for _, h in sizes)
        canvas = len(sizes) * 3 * w_max * h_max
        if canvas > MAX_CANVAS_BYTES:
            big = max(range(len(sizes)), key=lambda m: sizes[m][0] * sizes[m][1])
            raise FrameDecodeError(
                f"{names[big]}: a {sizes[big][0]}x{sizes[big][1]} JPEG among {len(sizes)} makes a "
                f"{canvas} byte canvas, more than {MAX_CANVAS_BYTES} (decode such data on the workers, "
                "--decode_on workers) [oversized_batch]"
            )
    return sizes


def aa_weights(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int) -> torch.Tensor:
    """float32 [N, out_size, in_size]: row i of matrix n resamples the pixels [start, start + length)
    of a line of in_size pixels to out_size pixels, with PyTorch's antialiased bilinear weights
    (`F.interpolate(..., mode="bilinear", antialias=True, align_corners=False)`, which torchvision's
    uint8 resize also uses): a triangle filter widened by the scale when downsampling, its taps cut
    to the crop and renormalised."""
    device = start.device
    length = length.to(torch.float64)
    scale = (length / out_size)[:, None, None]
    support = torch.clamp(scale, min=1.0)
    invscale = 1.0 / support
    center = scale * (torch.arange(out_size, device=device, dtype=torch.float64) + 0.5)[None, :, None]
    first = torch.clamp(torch.floor(center - support + 0.5), min=0.0)
    stop = torch.minimum(torch.floor(center + support + 0.5), length[:, None, None])
    pos = torch.arange(in_size, device=device, dtype=torch.float64)[None, None, :] - start[:, None, None]
    w = torch.clamp(1.0 - ((pos - center + 0.5) * invscale).abs(), min=0.0)
    w = w * ((pos >= first) & (pos < stop))
    return (w / w.sum(-1, keepdim=True)).to(torch.float32)


def crop_resize_all(
    images: Sequence[torch.Tensor],
    which: torch.Tensor,
    windows: torch.Tensor,
    im_size: int,
    chunk: int = 128,
) -> torch.Tensor:
    """uint8 [N, 3, im_size, im_size]: frame k = images[which[k]] cropped to windows[k] = [x0, y0,
    x1, y1) and resized with antialiased bilinear interpolation (as `transforms.resize_uint8`).

    Batched, so the cost does not grow with Python calls per frame: the images go into one padded
    uint8 canvas (one copy each), then each chunk of frames is two batched matrix products,
    rows (Wy) and columns (Wx), whose weight matrices are zero outside the frame's window."""
    if not len(which):
        return torch.empty((0, 3, im_size, im_size), dtype=torch.uint8)
    device = images[0].device
    h_max = max(int(img.shape[-2]) for img in images)
    w_max = max(int(img.shape[-1]) for img in images)
    canvas = torch.zeros((len(images), 3, h_max, w_max), dtype=torch.uint8, device=device)
    for m, img in enumerate(images):
        canvas[m, :, : img.shape[-2], : img.shape[-1]] = img
    which = which.to(device, non_blocking=True)
    win = windows.to(device, non_blocking=True)
    wy = aa_weights(win[:, 1], win[:, 3] - win[:, 1], im_size, h_max)
    wx = aa_weights(win[:, 0], win[:, 2] - win[:, 0], im_size, w_max).transpose(1, 2)
    out = torch.empty((len(which), 3, im_size, im_size), dtype=torch.uint8, device=device)
    # fp32 products (PyTorch's default); where a run turns TF32 matmuls on globally, the weights'
    # 10-bit mantissa moves pixels by well under a grey level (the flag is global, so it is not
    # toggled here: this runs in a thread beside the training step)
    for a in range(0, len(which), chunk):
        b = min(a + chunk, len(which))
        frames = canvas[which[a:b]].float()
        rows = torch.matmul(wy[a:b, None], frames)
        out[a:b] = torch.matmul(rows, wx[a:b, None]).round_().clamp_(0, 255).to(torch.uint8)
    return out


def decode_batch_on(batch: dict[str, Any], device: torch.device | str, im_size: int) -> dict[str, Any]:
    """The decoded batch (`frames` uint8 [B, S, 3, im_size, im_size] on `device`) of an encoded one;
    the other entries are kept as they are."""
    images = decode_jpegs(batch, device)
    which = batch["frame_jpeg"]
    b, s = which.shape
    frames = crop_resize_all(images, which.reshape(-1), batch["frame_window"].reshape(b * s, 4), im_size)
    frames = frames.view(b, s, 3, im_size, im_size)
    flips = batch["flips"].to(frames.device, non_blocking=True)
    # masks instead of boolean indexing: no host synchronisation in the training loop
    frames = torch.where(flips[:, 0, None, None, None, None], frames.flip(-1), frames)
    frames = torch.where(flips[:, 1, None, None, None, None], frames.flip(-2), frames)
    out = {k: v for k, v in batch.items() if k not in ENCODED_KEYS}
    out["frames"] = frames
    return out


_END = object()


class DevicePrefetcher:
    """Decodes the encoded batches of `source` on `device` in a background thread, on a CUDA
    stream of its own, up to `depth` batches ahead of the training step: nvJPEG and the resize then
    overlap the step instead of delaying it. A batch is handed over with the consumer's stream made
    to wait for its decoding (no host synchronisation). Errors of the source or of decoding are
    raised in the consumer; closing the iterator stops the thread."""

    def __init__(
        self, source: Iterator[Any], device: torch.device | str, im_size: int, depth: int = 2
    ) -> None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.source, self.device, self.im_size, self.depth = source, device, im_size, depth

    def _work(self, out: queue.Queue, stop: threading.Event) -> None:
        item: Any = _END
        try:
            stream = None
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
                stream = torch.cuda.Stream(self.device)
            for batch in self.source:
                if stop.is_set():
                    return
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    decoded = (
                        decode_batch_on(batch, self.device, self.im_size) if is_encoded(batch) else batch
                    )
                    event = torch.cuda.Event() if stream is not None else None
                    if event is not None:
                        event.record(stream)
                if not _put(out, (decoded, event), stop):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            item = exc
        _put(out, item, stop)

    def __iter__(self) -> Iterator[Any]:
        out: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        thread = threading.Thread(target=self._work, args=(out, stop), name="device-decode", daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for v in batch.values():
                        if isinstance(v, torch.Tensor) and v.is_cuda:
                            v.record_stream(current)
                yield batch
        finally:
            stop.set()
            while thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    out.get(timeout=0.05)


def _put(out: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put `item` unless the consumer stopped first; False if it did."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False
