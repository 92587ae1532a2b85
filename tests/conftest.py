"""Shared fixtures: a tiny generated CIFAR-10, imported through the official pickle format into a data cache."""
import os
from pathlib import Path

import pytest
import torch

from tests.cifar_fixtures import generate, write_official

torch.set_num_threads(1)  # tests are tiny: one thread is faster and deterministic on a shared 2-core machine
# A checkpoint after every epoch, as the kill and resume tests expect (the default waits 30 s between them);
# subprocesses inherit it. tests/e2e/test_run.py checks the default's sparser checkpoints.
os.environ["ABLATE_CHECKPOINT_SECONDS"] = "0"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    from runners.data import import_dataset

    root = tmp_path_factory.mktemp("data")
    write_official(root / "src", generate("cifar10", n_train=300, n_test=100, seed=0))
    import_dataset("cifar10", root / "src", data_dir=root / "cache")
    return root / "cache"
