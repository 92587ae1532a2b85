"""The choice lists a setting may take, in one torch-free place (the CLI's Click choices read them too)."""
from __future__ import annotations

# (kernel, stride, ceil_mode) of alexnet's three max-pools (after conv1, conv2, conv5). Paper §3.4 compares z=3, s=2
# with z=s=2, "which produces output of equivalent dimensions": 3x3/2 with ceil_mode (cuda-convnet's and Caffe's
# output size, ceil((n - 3) / 2) + 1 = floor(n / 2)) gives exactly the 2x2/2 map sizes, so the two arms differ in the
# overlap only (same FC input, same parameter count). "seed" is the seed chapter's own layout (2x2, 2x2, 3x3/2).
POOLINGS: dict[str, tuple[tuple[int, int, bool], ...]] = {
    "overlap": ((3, 2, True),) * 3,
    "nonoverlap": ((2, 2, False),) * 3,
    "seed": ((2, 2, False), (2, 2, False), (3, 2, False)),
}
# where alexnet's dropout acts: the outputs of fc1 and fc2 (paper §4.2, Caffe's drop6/drop7) or their inputs (the
# seed chapter's and torchvision's placement)
DROPOUT_AT = ("outputs", "inputs")
# which parameters weight decay applies to: the weights only (cuda-convnet's wc, Caffe's decay_mult 0 on biases,
# the paper's recipe) or every parameter (torch.optim's default)
DECAY_ON = ("weights", "all")
# a run in one of these states is finished: never trained again, and part of the results (a diverged run is a
# result: its loss went to nan or inf); any other state (failed, or no summary yet) is retried by the next run
FINISHED = ("finished", "diverged")
SCHEDULES = ("constant", "step", "plateau", "cosine")
PRECISIONS = ("fp32", "bf16")
PREPROCESS = ("standard", "paper")
AUGMENT = ("none", "flip", "crop_flip", "crop_flip_pca")  # the augmentation levels, weakest first
DATASETS = {"cifar10": 10, "cifar100": 100}  # name -> classes
ARCH_NAMES = ("alexnet", "convnet4")  # ablations/models.py's ARCHS builds each
# the whole cpu reproduction (every paper grid at its cpu budget) should fit one night on one 2-core machine
OVERNIGHT_HOURS = 8.0
