"""head.init=class_means: its one pass over the training images against one training epoch over the
same images, in one run (issue 25's "class_means over 10,000 images: time against one epoch").

    python benchmarks/class_means.py                     # 10,000 synthetic images (1,250 classes x 8), tiny net
    python benchmarks/class_means.py --classes 1250 --config model=iresnet18

Both sides use the run's own objects, built from the real configs (`dataset=synthetic_classes`,
the backbone and head of the config): the pass is `start_centres_at_class_means` over the
datamodule's unaugmented loader (eval mode, no gradient, val_batch_size); the epoch is the training
loader's batches through backbone, `head.loss`, backward and an SGD step (what a Lightning step
computes, without its logging and callbacks). One thread, wall time; the load average is printed
before and after (ratios measured under load are not to be published).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.precision import (
    Precision,  # float32: no autocast, inputs as they are
)

from facerec.paths import REPO_ROOT
from facerec.training.class_means import start_centres_at_class_means
from facerec.training.fit import build_module

sys.path.insert(0, str(REPO_ROOT / "tests"))  # the helper that composes the real configs, shared with the tests
from config_helpers import compose_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1250, help="synthetic classes of 8 images each")
    parser.add_argument("--config", nargs="*", default=[], help="more config overrides (model=..., head=...)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as output:
        cfg = compose_config(["dataset=synthetic_classes", f"dataset.num_classes={args.classes}", "logger=csv",
                              "val_sets=[]", *args.config], output)
        module = build_module(cfg, val_protocols={})
        datamodule = instantiate(cfg.dataset)
        datamodule.setup("fit")
        images = len(datamodule.train_set)
        load_before = os.getloadavg()[0]
        print(f"torch {torch.__version__}, 1 thread; {images} images ({args.classes} classes), model={cfg.model.name}, "
              f"batch {cfg.dataset.batch_size}; load average (1 min) before: {load_before:.2f}", flush=True)

        start = time.perf_counter()
        result = start_centres_at_class_means(module.backbone, module.head, datamodule.unaugmented_train_dataloader(),
                                              torch.device("cpu"), Precision())
        pass_seconds = time.perf_counter() - start

        optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
        module.train()
        start = time.perf_counter()
        for batch_images, labels in datamodule.train_dataloader():
            optimizer.zero_grad(set_to_none=True)
            loss, _ = module.head.loss(module.backbone(batch_images), labels)
            loss.backward()
            optimizer.step()
        epoch_seconds = time.perf_counter() - start
        load_after = os.getloadavg()[0]
    print(f"load average (1 min) after: {load_after:.2f}")
    print(f"| class-means pass | {pass_seconds:.1f} s | {result.images} images, top-1 {100 * result.top1:.1f} % |")
    print(f"| one training epoch | {epoch_seconds:.1f} s | |")
    print(f"| ratio | {pass_seconds / epoch_seconds:.2f}x | |")


if __name__ == "__main__":
    main()
