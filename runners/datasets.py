"""The CIFAR data sets: official names, label order and file layout, and what training gets (CifarData)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ablations.errors import UserError


# ----------------------------------------------------------------------------------------------------------------
# The data sets: official names, label order and file layout

@dataclass(frozen=True)
class DatasetInfo:
    pretty: str                       # how results and reports name the official set
    classes: tuple[str, ...]          # official class names; label = index
    coarse_classes: tuple[str, ...]   # CIFAR-100's 20 superclasses (empty for CIFAR-10)
    folder: str                       # the folder inside the official archive
    train_files: tuple[str, ...]      # official pickles, in label-file order
    test_files: tuple[str, ...]
    meta_file: str
    names_key: str                    # key of the class names in the meta pickle
    labels_key: str                   # key of the labels in a batch pickle
    torchvision: str                  # torchvision.datasets class (its URL and md5 for "download")
    example_source: str               # shown when the cache is missing

    @property
    def num_classes(self) -> int:
        return len(self.classes)


_CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle
caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant
flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree
motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate
poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider
squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle
wardrobe whale willow_tree wolf woman worm""".split())

_CIFAR100_COARSE = tuple("""
aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices household_furniture
insects large_carnivores large_man-made_outdoor_things large_natural_outdoor_scenes large_omnivores_and_herbivores
medium_mammals non-insect_invertebrates people reptiles small_mammals trees vehicles_1 vehicles_2""".split())

DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        pretty="CIFAR-10",
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        coarse_classes=(), folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
        meta_file="batches.meta", names_key="label_names", labels_key="labels", torchvision="CIFAR10",
        example_source="../shared/data/cifar10-jpeg-q75.tar.xz"),
    "cifar100": DatasetInfo(
        pretty="CIFAR-100", classes=_CIFAR100_CLASSES, coarse_classes=_CIFAR100_COARSE, folder="cifar-100-python",
        train_files=("train",), test_files=("test",), meta_file="meta", names_key="fine_label_names",
        labels_key="fine_labels", torchvision="CIFAR100", example_source="cifar-100-python.tar.gz"),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise UserError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


# ----------------------------------------------------------------------------------------------------------------
# What training gets

@dataclass(frozen=True, eq=False)  # eq=False: a tensor has no single truth value to compare with
class CifarData:
    name: str                  # "cifar10" | "cifar100"
    train_x: torch.Tensor      # (N, 3, 32, 32) uint8
    train_y: torch.Tensor      # (N,) int64
    test_x: torch.Tensor       # (M, 3, 32, 32) uint8
    test_y: torch.Tensor       # (M,) int64
    classes: tuple[str, ...]
    meta: dict                 # meta.json: label, source, sha256, counts, ...
    train_coarse: torch.Tensor | None = None  # (N,) int64, CIFAR-100 superclasses
    test_coarse: torch.Tensor | None = None

    def __post_init__(self):
        for x, y in ((self.train_x, self.train_y), (self.test_x, self.test_y)):
            if x.dtype != torch.uint8 or x.shape[1:] != (3, 32, 32) or y.dtype != torch.int64 or y.shape != x.shape[:1]:
                raise ValueError(f"CifarData wants (N, 3, 32, 32) uint8 images and (N,) int64 labels, "
                                 f"got {tuple(x.shape)} {x.dtype} and {tuple(y.shape)} {y.dtype}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)
