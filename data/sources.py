"""Where samples come from: the built-in MNIST digits, a folder of images, or an ``.npz``.

Array sources (``mnist``, ``.npz``) are loaded whole by :func:`open_array_source`;
folders are walked as a stream (:func:`walk_local_folder`, or an S3 listing) and
spilled to disk by ``data.listing``, which numbers the inputs and knows the class
names and the inputs already known to be unusable (a file that is not an image, an
empty class folder, an ``.npz`` label out of range) with the reason.
A shard's task carries the pixels of its array inputs, or the URLs of its files, so
the shard writer needs nothing else from the source wherever it runs.

Folder layout: if any file sits in a sub-folder, ``ROOT/<class name>/…`` is read as
classes (ids from the sorted class names; files at the top level are skipped);
otherwise the folder is one unconditional class. Unconditional sources have no class
names and every label is 0. Paths with a part starting with ``.`` are skipped as hidden.

Local folders, what is listed as skipped rather than read: a file name that is not
valid UTF-8 (shown with its bytes escaped, ``\\xff``), anything that is not a regular
file (a FIFO would block the reader), a broken symbolic link, and a symbolic link to a
folder (never followed, so a link cannot make the listing loop or leave the source).
A symbolic link to a file is read as the file it points to.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from data import storage
from data.mnist import MNIST_CLASS_NAMES, load_mnist

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


@dataclass(frozen=True)
class Input:
    """One input: ``ref`` names it in the manifest and in the sample's metadata (a path
    relative to the source for files, the position for arrays); ``label`` its class id."""

    ref: str
    label: int
    url: str = ""  # files: where to read it
    index: int = -1  # arrays: position in the array


@dataclass(frozen=True)
class Skipped:
    """An input that did not become a sample, and why."""

    ref: str
    reason: str


@dataclass(frozen=True)
class ArraySource:
    """An in-memory source (the built-in digits or an ``.npz``): pixels and its inputs."""

    description: str
    class_names: tuple[str, ...]
    images: np.ndarray  # uint8 [N, H, W(, C)]
    inputs: list[Input]
    skipped: list[Skipped] = field(default_factory=list)


def is_array_source(spec: str) -> bool:
    """``mnist`` and ``.npz`` files are read whole; anything else is an image folder."""
    return spec == "mnist" or spec.lower().endswith(".npz")


def open_array_source(spec: str) -> ArraySource:
    """``mnist`` or an ``.npz`` (local or ``s3://``), loaded whole."""
    if spec == "mnist":
        images, labels = load_mnist(32)
        inputs = [Input(ref=str(i), label=int(y), index=i) for i, y in enumerate(labels)]
        return ArraySource("the built-in MNIST digits", MNIST_CLASS_NAMES, images, inputs)
    return _npz_source(spec)


def check_folder(spec: str) -> None:
    """A local folder source must exist (S3 prefixes are checked by listing them)."""
    loc = storage.parse(spec)
    if not loc.is_s3 and not loc.path.is_dir():
        raise ValueError(
            f"SOURCE '{spec}' is not 'mnist', an existing .npz file or an existing image folder"
        )


def classify(name: str) -> str | None:
    """Why a listed file name cannot be an input whatever the layout, or None."""
    if hidden(name):
        return "hidden file or folder"
    if not name.lower().endswith(IMAGE_EXTENSIONS):
        return f"not an image file name ({', '.join(IMAGE_EXTENSIONS)})"
    return None


def hidden(name: str) -> bool:
    return any(part.startswith(".") for part in PurePosixPath(name).parts)


def local_class_folders(root: Path) -> set[str]:
    """Class folder names directly under a local ``root``, empty ones included (S3 has
    no empty folders): a class whose folder holds no images is reported, not lost."""
    return {
        d.name
        for d in root.iterdir()
        if d.is_dir()
        and not d.is_symlink()
        and _utf8(d.name) is not None
        and not d.name.startswith(".")
    }


def walk_local_folder(root: Path) -> Iterator[storage.Listed | Skipped]:
    """Regular files under ``root`` (recursively, links to files followed) and the
    entries that cannot be inputs, with the reason, as the walk meets them: one folder's
    entries at a time, so a folder of millions of files is never held in a list."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    for folder, dirs, names in os.walk(root, followlinks=False):
        base = Path(folder)
        for name in list(dirs):
            if (base / name).is_symlink():
                dirs.remove(name)
                yield Skipped(
                    _ref(root, base / name) + "/",
                    "symbolic link to a folder (links to folders are not followed)",
                )
        for name in names:
            path = base / name
            ref = _ref(root, path)
            reason = _unusable(path)
            if reason is not None:
                yield Skipped(ref, reason)
            else:
                yield storage.Listed(ref, str(path), path.stat().st_size)


def _ref(root: Path, path: Path) -> str:
    """The relative name as text, any non-UTF-8 bytes escaped (``\\xff``)."""
    return os.fsencode(path.relative_to(root).as_posix()).decode("utf-8", "backslashreplace")


def _utf8(name: str) -> str | None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return name


def _unusable(path: Path) -> str | None:
    """Why ``path`` cannot be read as an input, or None."""
    if _utf8(path.as_posix()) is None:
        return "file name is not valid UTF-8: rename it to read it"
    try:
        mode = path.stat().st_mode  # follows a link
    except FileNotFoundError:
        return "broken symbolic link" if path.is_symlink() else "disappeared while listing"
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return None


def _npz_source(url: str) -> ArraySource:
    try:
        arrays = np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False)
    except FileNotFoundError as error:
        raise ValueError(f"SOURCE '{url}' does not exist") from error
    except (OSError, ValueError) as error:
        raise ValueError(f"SOURCE '{url}' is not a readable .npz file: {error}") from error
    if "images" not in arrays:
        raise ValueError(
            f"{url} has no 'images' array; expected images (uint8 [N,H,W] or [N,H,W,C]) "
            f"and optionally labels (int [N]) and class_names; found {sorted(arrays)}"
        )
    images = _check_npz_images(url, arrays["images"])
    if "labels" not in arrays:
        inputs = [Input(ref=str(i), label=0, index=i) for i in range(len(images))]
        return ArraySource(f"{url} (unconditional)", (), images, inputs)
    labels = _check_npz_labels(url, arrays["labels"], len(images))
    valid = labels >= 0
    if "class_names" in arrays:
        class_names = tuple(str(n) for n in arrays["class_names"])
        valid &= labels < len(class_names)
    else:
        class_names = tuple(str(i) for i in range(int(labels[valid].max(initial=-1)) + 1))
    inputs = [Input(str(i), int(labels[i]), index=int(i)) for i in np.flatnonzero(valid)]
    skipped = [
        Skipped(str(i), f"label {labels[i]} outside 0 … {len(class_names) - 1}")
        for i in np.flatnonzero(~valid)
    ]
    return ArraySource(f"{url} ({len(class_names)} classes)", class_names, images, inputs, skipped)


def _check_npz_images(url: str, images: np.ndarray) -> np.ndarray:
    if images.dtype != np.uint8:
        raise ValueError(f"{url}: 'images' must be uint8, got {images.dtype}; convert to 0 … 255")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
        raise ValueError(
            f"{url}: 'images' must be [N,H,W] or [N,H,W,C] with C in 1, 3, 4; "
            f"got shape {images.shape}"
        )
    return images


def _check_npz_labels(url: str, labels: np.ndarray, count: int) -> np.ndarray:
    if labels.shape != (count,):
        raise ValueError(f"{url}: 'labels' must have shape ({count},), got {labels.shape}")
    if np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0):
        labels = labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{url}: 'labels' must be integers, got {labels.dtype}")
    return labels.astype(np.int64)
