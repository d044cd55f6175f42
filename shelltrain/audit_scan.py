"""task=audit's look at every image: what each one is (content hash, perceptual hash, a small thumbnail, size,
grey or colour, readable or not), then the exact and near-duplicate pairs within and across splits, and the
split's health figures (class counts, imbalance, missing classes, size and aspect outliers, grey/colour mix).

Near duplicates are pairs whose 64-bit perceptual hashes (imagehash's phash) are at most `audit.hash_distance`
bits apart and whose 16x16 grey thumbnails differ by at most `audit.pixel_tolerance` on average: the hash finds
candidates cheaply, the thumbnail keeps look-alike but different images (two similar handwritten digits) out.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from shelltrain.errors import UserError

THUMB = 16  # side of the grey thumbnail near duplicates are confirmed with
GREY_SPREAD = 2  # an RGB image whose channels differ by at most this everywhere (thumbnail) counts as grey
BLOCK = 512  # rows of the pairwise hash distances computed at once (memory: BLOCK x N x 8 bytes)


@dataclass
class Sample:
    """One image as the audit sees it; `problem` is "zero-byte" or "unreadable" for a file that cannot be used."""

    split: str
    index: int
    label: int
    id: str  # the file path, or the index in the split
    key: str = ""  # hash of the file's bytes, or of the image's pixels
    phash: int = 0
    thumb: np.ndarray = field(default_factory=lambda: np.zeros((THUMB, THUMB), np.float32))
    width: int = 0
    height: int = 0
    grey: bool = True
    problem: str | None = None

    def brief(self) -> dict[str, Any]:
        return {"split": self.split, "index": self.index, "id": self.id, "label": self.label}


def imagehash_module() -> Any:
    """imagehash, or a one-line UserError saying how to install it."""
    try:
        import imagehash
    except ImportError:
        raise UserError('task=audit needs the imagehash library: pip install "shelltrain[audit]"') from None
    return imagehash


def describe_image(sample: Sample, image: Image.Image, key: str) -> Sample:
    """Fill `sample` from a decoded image: hashes, thumbnail, size, grey or colour."""
    sample.key, sample.width, sample.height = key, image.width, image.height
    rgb = image.convert("RGB").resize((THUMB, THUMB), Image.BILINEAR)
    pixels = np.asarray(rgb, dtype=np.int16)
    sample.grey = int((pixels.max(2) - pixels.min(2)).max()) <= GREY_SPREAD
    grey = rgb.convert("L")
    sample.thumb = np.asarray(grey, dtype=np.float32) / 255.0
    bits = imagehash_module().phash(image.convert("L")).hash.flatten()
    sample.phash = int("".join("1" if b else "0" for b in bits), 2)
    return sample


def scan_files(split: str, paths: list[str], labels: list[int]) -> list[Sample]:
    """Each file read once: its bytes hashed, decoded (or marked zero-byte / unreadable), described."""
    samples = []
    for i, (path, label) in enumerate(zip(paths, labels)):
        sample = Sample(split, i, int(label), str(path))
        with open(path, "rb") as f:
            raw = f.read()
        if not raw:
            sample.problem = "zero-byte"
        else:
            try:
                with Image.open(io.BytesIO(raw)) as image:
                    image.load()
                    describe_image(sample, image, hashlib.blake2b(raw, digest_size=16).hexdigest())
            except (OSError, ValueError, Image.DecompressionBombError):
                sample.problem = "unreadable"
        samples.append(sample)
    return samples


def scan_arrays(split: str, images: np.ndarray, labels: list[int]) -> list[Sample]:
    """In-memory uint8 N x C x H x W images: hashed by their pixels."""
    samples = []
    for i, (pixels, label) in enumerate(zip(images, labels)):
        hwc = np.ascontiguousarray(pixels.transpose(1, 2, 0))
        image = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc[:, :, :3])
        key = hashlib.blake2b(hwc.tobytes(), digest_size=16).hexdigest()
        samples.append(describe_image(Sample(split, i, int(label), str(i)), image, key))
    return samples


def duplicate_pairs(samples: list[Sample], distance: int, tolerance: float) -> list[dict[str, Any]]:
    """Exact (same bytes or pixels) and near pairs among readable samples, each once: kind, the two samples,
    their hash distance and mean thumbnail difference. An exact group of n images gives n - 1 pairs (each with
    the first)."""
    usable = [s for s in samples if s.problem is None]
    pairs: list[dict[str, Any]] = []
    first: dict[str, Sample] = {}
    for s in usable:
        if s.key in first:
            pairs.append(_pair("exact", first[s.key], s, 0, 0.0))
        else:
            first[s.key] = s
    if tolerance <= 0:
        return pairs
    hashes = np.array([s.phash for s in usable], dtype=np.uint64)
    thumbs = np.stack([s.thumb for s in usable]) if usable else np.zeros((0, THUMB, THUMB), np.float32)
    for start in range(0, len(usable), BLOCK):
        block = np.bitwise_count(hashes[start : start + BLOCK, None] ^ hashes[None, start:])
        for i, j in zip(*np.nonzero(block <= distance)):
            a, b = start + int(i), start + int(j)
            if b <= a or usable[a].key == usable[b].key:
                continue
            difference = float(np.abs(thumbs[a] - thumbs[b]).mean())
            if difference <= tolerance:
                pairs.append(_pair("near", usable[a], usable[b], int(block[i, j]), difference))
    return pairs


def _pair(kind: str, a: Sample, b: Sample, bits: int, difference: float) -> dict[str, Any]:
    return {
        "kind": kind,
        "a": a.brief(),
        "b": b.brief(),
        "hash_distance": bits,
        "difference": round(difference, 5),
        "leak": a.split != b.split,
    }


def health(samples: list[Sample], classes: list[str], factor: float) -> dict[str, Any]:
    """Per split: class counts, missing classes, grey/colour counts, problem files, size and aspect outliers;
    and the train split's imbalance ratio (largest class count over the smallest)."""
    report: dict[str, Any] = {}
    for split in dict.fromkeys(s.split for s in samples):
        mine = [s for s in samples if s.split == split]
        counts = np.bincount([s.label for s in mine], minlength=len(classes))
        readable = [s for s in mine if s.problem is None]
        report[split] = {
            "images": len(mine),
            "class_counts": {name: int(n) for name, n in zip(classes, counts)},
            "missing_classes": [name for name, n in zip(classes, counts) if n == 0],
            "grey": sum(s.grey for s in readable),
            "colour": sum(not s.grey for s in readable),
            "problems": [{**s.brief(), "problem": s.problem} for s in mine if s.problem],
            "outliers": _outliers(readable, factor),
        }
    train = report["train"]["class_counts"] if "train" in report else {}
    present = [n for n in train.values() if n]
    report["imbalance_ratio"] = max(present) / min(present) if present else None
    return report


def _outliers(samples: list[Sample], factor: float) -> list[dict[str, Any]]:
    """Images whose area or aspect ratio is more than `factor` times (or less than 1/factor of) the median."""
    if not samples:
        return []
    area = np.array([s.width * s.height for s in samples], dtype=np.float64)
    aspect = np.array([s.width / max(1, s.height) for s in samples], dtype=np.float64)
    out = []
    for values, what in ((area, "area"), (aspect, "aspect")):
        ratio = values / np.median(values)
        for k in np.nonzero((ratio > factor) | (ratio < 1 / factor))[0]:
            s = samples[int(k)]
            out.append({**s.brief(), "what": what, "width": s.width, "height": s.height, "ratio": float(ratio[k])})
    return out
