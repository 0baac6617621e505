"""The tutorial's Datasets, public: torch `Dataset`s over image files, for your own loops.

`LabelFolder(root_dir, label_dir)` is the tutorial's `Mydata`: every file below root_dir/label_dir,
item i is (PIL RGB image, label_dir), and `ants + bees` concatenates (torch's `ConcatDataset`)::

    ants, bees = LabelFolder("data/hymenoptera_data/train", "ants"), LabelFolder(..., "bees")
    both = ants + bees

`FolderDataset(split, transform)` serves a resolved `Split` (`visionflow.data.splits`: a folder
per class, the bundled sample, or CIFAR-10 as `prepare_cifar10` converts it) as torchvision's
`ImageFolder` or `CIFAR10` would: item i is (transform(image i), class index i), ready for a
`DataLoader`. Images are read with `images.load_rgb` (any mode to RGB; an unreadable file is a
`DatasetError` naming it). `examples/tutorial.py` walks through both; the pipeline itself trains
from decoded uint8 tensors (`visionflow.data.decoded`) instead. Kept apart from
`visionflow.data.splits`, which resolves datasets without importing torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from PIL import Image
from torch.utils.data import Dataset

from visionflow.data.images import load_rgb
from visionflow.data.splits import Split, files_under
from visionflow.errors import DatasetError


class FolderDataset(Dataset):
    """torch Dataset over a Split: item i is (transform(load_rgb(file i)), label i)."""

    def __init__(self, split: Split, transform: Callable[[Image.Image], object] | None = None) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[object, int]:
        image = load_rgb(self.split.files[index])
        return (self.transform(image) if self.transform else image), self.split.labels[index]


class LabelFolder(Dataset):
    """The tutorial's `Mydata(root_dir, label_dir)`: every file in root_dir/label_dir, item i is
    (PIL RGB image, label_dir). `ants + bees` concatenates (torch's Dataset.__add__)."""

    def __init__(self, root_dir: Path | str, label_dir: str) -> None:
        self.root_dir = Path(root_dir)
        self.label_dir = label_dir
        folder = self.root_dir / label_dir
        if not folder.is_dir():
            raise DatasetError(
                f"Label folder '{folder}' not found; expected a folder of images "
                f"named after its label inside {self.root_dir}"
            )
        self.files = files_under(folder)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        return load_rgb(self.files[index]), self.label_dir
