"""Labeled images or sounds: the built-in digits, a folder of class subfolders, or a ``path,label`` CSV.

For evaluation (:func:`load_labeled`), every dataset returns ``uint8`` tensors of shape ``(3, S, S)`` like the
training datasets and carries ``labels`` (int64 class indices) and ``classes`` (class names, index order); it must
be complete: an unreadable image is an error naming the file. For training (``data.labels``,
:func:`training_labels`), a labeled set gives some of the training images their class and leaves the others
unlabeled (-1): semi-supervised training on a folder of images of which a subset is labeled.

Labeled sounds (:func:`load_labeled_sounds`) come as the same class folders or CSV, and return float32 clips of shape
``(1, samples)`` like :class:`unsupdistill.data.AudioFolderDataset`; :func:`labeled_kind` tells which kind a set holds.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from unsupdistill.config.sections import CSV_FORMAT
from unsupdistill.data.audio import AUDIO_EXTENSIONS, check_sound, describe_sound_error, fit_clip, read_sound
from unsupdistill.data.digits import DigitsDataset, digits_split
from unsupdistill.data.folder import IMAGE_EXTENSIONS, DataError, list_files, load_rgb, resize_center_crop

logger = logging.getLogger(__name__)

_MAX_LISTED = 5  # paths named in one error message
_SPEC_HELP = f"give 'digits', a folder with one subfolder of images per class, or a .csv file: {CSV_FORMAT}"
# per kind of labeled set: the extensions a class folder's files have, and what they are called in messages
_KINDS = {"image": (IMAGE_EXTENSIONS, "images"), "audio": (AUDIO_EXTENSIONS, "sound files"),
          "any": (IMAGE_EXTENSIONS | AUDIO_EXTENSIONS, "images or sound files")}


class LabeledDataset(Protocol):
    """What evaluation needs: items (``(3, S, S)`` uint8 images, ``(1, samples)`` float32 clips), their class indices
    and the class names."""

    labels: Tensor
    classes: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Tensor: ...


class LabeledImages(Dataset):
    """Image files with class labels, each decoded to RGB, shorter side resized to ``S`` and centre-cropped.

    Args:
        paths: the image files.
        labels: class index of each file, into ``classes``.
        classes: class names, in index order.
        image_size: side ``S`` of the returned square images.
        verify: open every file's header now, so a missing or non-image file fails before
            feature extraction starts (truncated files still fail when read).
    """

    def __init__(
        self, paths: Sequence[str | Path], labels: Sequence[int], classes: Sequence[str], image_size: int,
        verify: bool = True,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = [str(path) for path in paths]
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.classes = list(classes)
        self.image_size = image_size
        if verify:
            _check_every_file(self.paths, _image_header_error, "image")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        """The image as a ``uint8`` tensor of shape ``(3, image_size, image_size)``."""
        path = self.paths[index]
        try:
            img = load_rgb(path, draft_size=self.image_size)
        except Exception as err:  # noqa: BLE001 - decoders raise many types on corrupt data
            raise DataError(f"labeled image {path} cannot be read ({type(err).__name__}: {err}); "
                            "evaluation needs every image: fix or remove it") from err
        return resize_center_crop(img, self.image_size)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(images={len(self.paths)}, classes={len(self.classes)}, "
                f"image_size={self.image_size})")


class LabeledSounds(Dataset):
    """Sound files with class labels, each read mono at one rate and cut or padded to a clip (see
    :class:`unsupdistill.data.AudioFolderDataset`).

    Args:
        paths: the sound files.
        labels: class index of each file, into ``classes``.
        classes: class names, in index order.
        sample_rate: the clips' rate in Hz.
        clip_samples: the clips' length in samples.
        verify: read every file's header now, so a missing or unreadable file fails before feature extraction
            starts (a corrupt stream still fails when read).
    """

    def __init__(
        self, paths: Sequence[str | Path], labels: Sequence[int], classes: Sequence[str], sample_rate: int,
        clip_samples: int, verify: bool = True,
    ) -> None:
        if sample_rate < 1 or clip_samples < 1:
            raise ValueError(f"sample_rate and clip_samples must be >= 1, got {sample_rate} and {clip_samples}")
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = [str(path) for path in paths]
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.classes = list(classes)
        self.sample_rate = sample_rate
        self.clip_samples = clip_samples
        if verify:
            _check_every_file(self.paths, lambda path: check_sound(Path(path), "header")[0], "sound")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        """The clip as a float32 tensor of shape ``(1, clip_samples)``."""
        path = self.paths[index]
        try:
            wave = read_sound(path, self.sample_rate, self.clip_samples)
        except Exception as err:  # noqa: BLE001 - decoders raise many types on corrupt data
            raise DataError(f"labeled sound {path} cannot be read ({describe_sound_error(err)}); "
                            "evaluation needs every sound: fix or remove it") from err
        return torch.from_numpy(fit_clip(wave, self.clip_samples).copy())[None]  # (1, clip_samples)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(sounds={len(self.paths)}, classes={len(self.classes)}, "
                f"sample_rate={self.sample_rate}, clip_samples={self.clip_samples})")


def _image_header_error(path: str) -> str | None:
    """Why an image's header cannot be read, or None."""
    try:
        load_rgb(path, verify_only=True)
    except Exception as err:  # noqa: BLE001 - decoders raise many types on corrupt data
        return f"{type(err).__name__}: {err}"
    return None


def _check_every_file(paths: list[str], error: Callable[[str], str | None], noun: str) -> None:
    """Raise :class:`DataError` naming the files for which ``error`` gives a reason."""
    failed = []
    for path in tqdm(paths, desc=f"checking {noun}s", unit="file", disable=len(paths) < 1000):
        reason = error(path)
        if reason is not None:
            failed.append(f"{path}: {reason}")
    if failed:
        listed = "\n  ".join(failed[:_MAX_LISTED])
        more = f"\n  ... and {len(failed) - _MAX_LISTED} more" if len(failed) > _MAX_LISTED else ""
        raise DataError(f"{len(failed)} of {len(paths)} labeled {noun}s cannot be read:\n  {listed}{more}\n"
                        f"evaluation needs every {noun}: fix or remove them")


class LabeledDigits(DigitsDataset):
    """scikit-learn's digits with class names "0".."9"; see :func:`unsupdistill.data.digits_split`."""

    classes = [str(digit) for digit in range(10)]


def load_labeled(spec: str | Path, image_size: int, split: Literal["train", "test"]) -> LabeledDataset:
    """Load one split of a labeled evaluation set.

    Args:
        spec: ``"digits"``: scikit-learn's digits, split by :func:`unsupdistill.data.digits_split`
            (stratified, ``random_state=0``: 1,257 train and 540 test images); a folder with one
            subfolder per class (class = subfolder name, in sorted order; images found recursively
            inside it); or a ``.csv`` file with a ``path,label`` header (paths absolute or relative
            to the CSV's folder; labels are names, indexed in sorted order). A folder or CSV holds
            one split already: pass the train and test sets as two specs.
        image_size: side ``S`` of the returned ``(3, S, S)`` uint8 images.
        split: ``"train"`` or ``"test"``; selects the digits split, and names the set in errors.

    Raises:
        DataError: the folder or CSV is missing, malformed, has fewer than two classes, an empty
            class, or files that cannot be read; the message names the offending path.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is invalid; allowed values: train, test")
    if str(spec) == "digits":
        train, test = digits_split()
        return LabeledDigits(image_size, train if split == "train" else test)
    paths, names, classes = labeled_files(spec, f"{split} set")
    index = {name: i for i, name in enumerate(classes)}
    return LabeledImages(paths, [index[name] for name in names], classes, image_size)


def load_labeled_sounds(spec: str | Path, sample_rate: int, clip_samples: int,
                        split: Literal["train", "test"]) -> LabeledSounds:
    """Load one split of a labeled evaluation set of sounds.

    Args:
        spec: a folder with one subfolder per class, or a ``path,label`` CSV, as for :func:`load_labeled`.
        sample_rate: the clips' rate in Hz.
        clip_samples: the clips' length in samples.
        split: ``"train"`` or ``"test"``; names the set in errors.

    Raises:
        DataError: the folder or CSV is missing, malformed, has fewer than two classes, an empty class, or files
            that cannot be read; the message names the offending path.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is invalid; allowed values: train, test")
    if str(spec) == "digits":
        raise DataError("the digits are images: give a folder of class subfolders of sound files, or a path,label CSV "
                        "of sound files")
    paths, names, classes = labeled_files(spec, f"{split} set", "audio")
    index = {name: i for i, name in enumerate(classes)}
    return LabeledSounds(paths, [index[name] for name in names], classes, sample_rate, clip_samples)


def labeled_kind(spec: str | Path) -> Literal["image", "audio"]:
    """Whether a labeled set (``digits``, a folder of class subfolders, a ``path,label`` CSV) holds images or sounds
    (a CSV's files by their extension; one that is neither counts as an image).

    Raises:
        DataError: a bad labeled set (see :func:`labeled_files`), or one holding both (the message counts each).
    """
    if str(spec) == "digits":
        return "image"
    paths, _, _ = labeled_files(spec, "labeled set", "any")
    sounds = sum(path.suffix.lower() in AUDIO_EXTENSIONS for path in paths)
    if sounds and sounds < len(paths):
        images = len(paths) - sounds
        raise DataError(f"labeled set {spec} holds {images} images and {sounds} sound files; a labeled set is one kind "
                        f"of data: move the {sounds} sound files (or the {images} images) into a set of their own")
    return "audio" if sounds else "image"


def labeled_files(spec: str | Path, role: str,
                  kind: Literal["image", "audio", "any"] = "image") -> tuple[list[Path], list[str], list[str]]:
    """The file paths, class names and classes (sorted) of a folder of class subfolders or a ``path,label`` CSV.

    Args:
        spec: the folder or CSV.
        role: how errors name the set (``train set``, ``data.labels``).
        kind: the files a class folder's listing keeps: images, sounds, or either (a CSV's rows are all kept).

    Raises:
        DataError: the folder or CSV is missing or malformed, names a missing file, has an empty class or fewer
            than two classes; the message names the file and the fix.
    """
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".csv":
        paths, names = _read_csv(path, role)
    elif path.is_dir():
        paths, names = _read_class_folders(path, role, kind)
    elif path.exists():
        raise DataError(f"{role} {path} is neither a folder nor a .csv file; {_SPEC_HELP}")
    else:
        raise DataError(f"{role} folder {path} does not exist; {_SPEC_HELP}")
    classes = sorted(set(names))
    if len(classes) < 2:
        raise DataError(f"{role} {path} has only one class ({classes[0]!r}); "
                        f"classification needs at least two: add the other classes' {_KINDS[kind][1]}")
    return paths, names, classes


@dataclass
class TrainingLabels:
    """The labels of a training set: per image its class index, -1 where it has none.

    Attributes:
        labels: (N,) int64, in the training dataset's order.
        classes: class names in index order.
        source: where they came from (``data.labels``), for messages.
    """

    labels: Tensor
    classes: list[str]
    source: str

    @property
    def labeled(self) -> int:
        """The number of labeled images."""
        return int((self.labels >= 0).sum())


def training_labels(spec: str | None, dataset: Dataset) -> TrainingLabels | None:
    """The labels ``data.labels`` gives the training images of ``dataset``; None when it is null.

    ``digits``: the built-in digits' own labels on their train split (the test split stays unlabeled, so the
    end-of-run scores on it stay honest). A folder of class subfolders or a ``path,label`` CSV: every image it
    names must be one of the training images (inside ``data.path``, readable); the others stay unlabeled.

    Raises:
        DataError: a bad labeled set (see :func:`labeled_files`), or labeled images that are not training images.
    """
    if spec is None:
        return None
    if str(spec) == "digits":
        if not isinstance(dataset, DigitsDataset):
            raise DataError("data.labels=digits labels the built-in digits only; for an image folder give a folder "
                            "of class subfolders or a path,label CSV")
        labels = torch.full((len(dataset),), -1, dtype=torch.int64)
        train, _ = digits_split()
        labels[train] = dataset.labels[train]
        return TrainingLabels(labels, LabeledDigits.classes, "data.labels=digits (train split)")
    files = getattr(dataset, "files", None)
    if files is None:
        raise DataError(f"data.labels={spec} labels images of an image folder: set data.path to the folder that "
                        "holds them")
    kind = getattr(dataset, "kind", "image")
    noun = _KINDS[kind][1]
    paths, names, classes = labeled_files(spec, "data.labels", kind)
    position = {os.path.realpath(file): i for i, file in enumerate(files)}
    index = {name: i for i, name in enumerate(classes)}
    labels = torch.full((len(files),), -1, dtype=torch.int64)
    outside = []
    for path, name in zip(paths, names):
        i = position.get(os.path.realpath(path))
        if i is None:
            outside.append(str(path))
        else:
            labels[i] = index[name]
    if outside:
        listed = "\n  ".join(outside[:_MAX_LISTED])
        more = f"\n  ... and {len(outside) - _MAX_LISTED} more" if len(outside) > _MAX_LISTED else ""
        root = getattr(dataset, "root", "data.path")
        raise DataError(f"{len(outside)} {noun} of data.labels {spec} are not among the readable training {noun} in "
                        f"data.path {root}:\n  {listed}{more}\nput the labeled {noun} inside data.path (or set "
                        "data.path to the folder that holds them); unreadable ones are listed in skipped.txt")
    return TrainingLabels(labels, classes, f"data.labels={spec}")


def _read_class_folders(root: Path, split: str, kind: str) -> tuple[list[Path], list[str]]:
    """File paths and class names of a folder holding one subfolder per class (``split``: how errors name it;
    ``kind``: the files kept, a key of ``_KINDS``)."""
    extensions, noun = _KINDS[kind]
    class_dirs = sorted(entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{split} folder {root} has no class subfolders; put each class's {noun} "
                        f"in a subfolder named after the class ({root}/<class>/<file>)")
    loose = [entry for entry in root.iterdir() if entry.is_file() and not entry.name.startswith(".")]
    if loose:
        logger.warning("%d files directly in %s are ignored: only %s inside class subfolders are used",
                       len(loose), root, noun)
    paths: list[Path] = []
    names: list[str] = []
    for class_dir in class_dirs:
        files = list_files(class_dir, extensions, "class folder")
        if not files:
            raise DataError(f"class folder {class_dir} of {split} {root} holds no {noun}; "
                            f"add {noun} or remove the folder")
        paths += files
        names += [class_dir.name] * len(files)
    return paths, names


def _read_csv(csv_path: Path, split: str) -> tuple[list[Path], list[str]]:
    """Image paths and class names from a ``path,label`` CSV file (:data:`CSV_FORMAT`); an image named on several rows
    is read once, and refused if they give it different labels."""
    if not csv_path.is_file():
        raise DataError(f"{split} CSV {csv_path} does not exist; {_SPEC_HELP}")
    with open(csv_path, newline="", encoding="utf-8-sig") as file:  # utf-8-sig: tolerate a byte-order mark
        reader = csv.DictReader(file)
        columns = [name.strip() for name in reader.fieldnames or []]
        if not columns:
            raise DataError(f"{split} CSV {csv_path} is empty; a labeled CSV needs {CSV_FORMAT}")
        missing_columns = [name for name in ("path", "label") if name not in columns]
        if missing_columns:
            first = ",".join(columns)
            a_row = (csv_path.parent / os.path.expanduser(columns[0])).is_file()  # an image's row, no header
            raise DataError(f"{split} CSV {csv_path} has no {' or '.join(repr(c) for c in missing_columns)} "
                            f"column: its first line is '{first}'"
                            + (", an image's row: add the line path,label above it" if a_row else "")
                            + f". A labeled CSV needs {CSV_FORMAT} ({csv_path.parent})")
        reader.fieldnames = columns
        paths: list[Path] = []
        names: list[str] = []
        missing_files: list[str] = []
        seen: dict[str, tuple[str, int]] = {}  # real path -> (label, line) of its first row
        conflicts: list[str] = []
        repeated = 0
        for row in reader:
            file_cell, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            if not file_cell or not label:
                raise DataError(f"{split} CSV {csv_path}, line {reader.line_num}: empty path or label")
            image = Path(os.path.expanduser(file_cell))
            image = image if image.is_absolute() else csv_path.parent / image
            first = seen.setdefault(os.path.realpath(image), (label, reader.line_num))
            if first[1] != reader.line_num:  # a second row of one image: read once, or refused if it disagrees
                if first[0] != label:
                    conflicts.append(f"{image}: {first[0]!r} on line {first[1]}, {label!r} on line {reader.line_num}")
                repeated += 1
                continue
            if not image.is_file():
                missing_files.append(f"line {reader.line_num}: {image}")
            paths.append(image)
            names.append(label)
    if conflicts:
        listed = "\n  ".join(conflicts[:_MAX_LISTED])
        more = f"\n  ... and {len(conflicts) - _MAX_LISTED} more" if len(conflicts) > _MAX_LISTED else ""
        raise DataError(f"{split} CSV {csv_path} gives an image two different labels on two rows ({len(conflicts)} "
                        f"such images):\n  {listed}{more}\nkeep one row per image, with its right label")
    if repeated:
        logger.warning("%s CSV %s: %d rows repeat an image named above with the same label; each image is read once",
                       split, csv_path, repeated)
    if not paths:
        raise DataError(f"{split} CSV {csv_path} has a header but no rows; add one 'path,label' row per image")
    if missing_files:
        listed = "\n  ".join(missing_files[:_MAX_LISTED])
        more = f"\n  ... and {len(missing_files) - _MAX_LISTED} more" if len(missing_files) > _MAX_LISTED else ""
        raise DataError(f"{len(missing_files)} files named in {split} CSV {csv_path} do not exist "
                        f"(relative paths are taken from the CSV's folder):\n  {listed}{more}")
    return paths, names


def align_labels(train: LabeledDataset, test: LabeledDataset) -> Tensor:
    """The test set's labels as indices into ``train.classes``, matching classes by name.

    Raises:
        DataError: the test set has classes the train set lacks.
    """
    index = {name: i for i, name in enumerate(train.classes)}
    unknown = [name for name in test.classes if name not in index]
    if unknown:
        shown = ", ".join(repr(name) for name in unknown[:_MAX_LISTED]) + (", ..." if len(unknown) > _MAX_LISTED
                                                                           else "")
        raise DataError(f"{len(unknown)} test classes are not among the {len(train.classes)} train classes "
                        f"({shown}); both sets must name their classes the same way")
    mapping = torch.tensor([index[name] for name in test.classes], dtype=torch.int64)
    return mapping[test.labels]
