"""Where samples come from: the built-in MNIST digits, a folder of images, or an ``.npz``.

``open_source(spec)`` lists a source without decoding it: which inputs there are, their
labels, the class names, and the inputs already known to be unusable (a file that is
not an image, an empty class folder, an ``.npz`` label out of range) with the reason.
``Source.read`` then fetches one input's raw content; decoding happens in the writer.

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


@dataclass
class Source:
    """A listed source. ``images`` holds the pixels of array sources, None for files."""

    description: str
    class_names: tuple[str, ...]
    inputs: list[Input]
    skipped: list[Skipped] = field(default_factory=list)
    images: np.ndarray | None = None

    def read(self, item: Input) -> bytes | np.ndarray:
        """Raw content of one input: encoded file bytes, or uint8 pixels [H, W(, C)]."""
        if self.images is not None:
            return self.images[item.index]
        return storage.read_bytes(item.url)


def open_source(spec: str) -> Source:
    """``mnist``, a path or ``s3://`` URL of an ``.npz`` file, or of an image folder."""
    if spec == "mnist":
        images, labels = load_mnist(32)
        inputs = [Input(ref=str(i), label=int(y), index=i) for i, y in enumerate(labels)]
        return Source("the built-in MNIST digits", MNIST_CLASS_NAMES, inputs, images=images)
    if spec.lower().endswith(".npz"):
        return _npz_source(spec)
    loc = storage.parse(spec)
    if not loc.is_s3 and not loc.path.is_dir():
        raise ValueError(
            f"SOURCE '{spec}' is not 'mnist', an existing .npz file or an existing image folder"
        )
    return _folder_source(spec)


def _folder_source(url: str) -> Source:
    loc = storage.parse(url)
    unusable: list[Skipped] = []
    if loc.is_s3:
        files = list(storage.list_files(url))  # S3 keys are UTF-8 objects, never links
    else:
        files, unusable = list_local_folder(loc.path)
    in_folders = any("/" in f.name for f in files if not _hidden(f.name))
    class_names = _class_names(url, files) if in_folders else ()
    class_ids = {name: i for i, name in enumerate(class_names)}
    inputs, skipped = [], []
    for f in files:
        parts = PurePosixPath(f.name).parts
        if _hidden(f.name):
            skipped.append(Skipped(f.name, "hidden file or folder"))
        elif not f.name.lower().endswith(IMAGE_EXTENSIONS):
            skipped.append(
                Skipped(f.name, f"not an image file name ({', '.join(IMAGE_EXTENSIONS)})")
            )
        elif in_folders and len(parts) == 1:
            skipped.append(Skipped(f.name, "outside any class folder"))
        else:
            inputs.append(
                Input(ref=f.name, label=class_ids[parts[0]] if in_folders else 0, url=f.url)
            )
    used = {i.label for i in inputs}
    for name in class_names:
        if class_ids[name] not in used:
            skipped.append(Skipped(f"{name}/", "class folder holds no images"))
    skipped += unusable
    kind = f"{len(class_names)} class folders" if in_folders else "unconditional images"
    return Source(f"{url} ({kind})", class_names, inputs, sorted(skipped, key=lambda s: s.ref))


def _hidden(name: str) -> bool:
    return any(part.startswith(".") for part in PurePosixPath(name).parts)


def _class_names(url: str, files: list[storage.Listed]) -> tuple[str, ...]:
    names = {PurePosixPath(f.name).parts[0] for f in files if "/" in f.name}
    loc = storage.parse(url)
    if not loc.is_s3:  # a local class folder may be empty; S3 has no empty folders
        names |= {
            d.name
            for d in loc.path.iterdir()
            if d.is_dir() and not d.is_symlink() and _utf8(d.name) is not None
        }
    return tuple(sorted(n for n in names if not n.startswith(".")))


def list_local_folder(root: Path) -> tuple[list[storage.Listed], list[Skipped]]:
    """Regular files under ``root`` (recursively, sorted by relative name, links to
    files followed) and the entries that cannot be inputs, with the reason."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    files: list[storage.Listed] = []
    skipped: list[Skipped] = []
    for folder, dirs, names in os.walk(root, followlinks=False):
        base = Path(folder)
        for name in list(dirs):
            if (base / name).is_symlink():
                dirs.remove(name)
                skipped.append(
                    Skipped(
                        _ref(root, base / name) + "/",
                        "symbolic link to a folder (links to folders are not followed)",
                    )
                )
        dirs.sort()
        for name in names:
            path = base / name
            ref = _ref(root, path)
            reason = _unusable(path)
            if reason is not None:
                skipped.append(Skipped(ref, reason))
            else:
                files.append(storage.Listed(ref, str(path), path.stat().st_size))
    files.sort(key=lambda f: f.name)
    return files, skipped


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


def _npz_source(url: str) -> Source:
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
        return Source(f"{url} (unconditional)", (), inputs, images=images)
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
    return Source(f"{url} ({len(class_names)} classes)", class_names, inputs, skipped, images)


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
