"""One epoch over a RecordDataset under Lightning DDP (2 CPU processes, gloo, 2 loader workers each).

Run by tests/test_recordio.py as `python ddp_record_epoch.py REC_ROOT NUM_CLASSES OUT_DIR` (Lightning's
ddp re-executes this script for rank 1, which must not happen under pytest). Each rank writes the
SHA-1 of every image it trained on to OUT_DIR/rank<r>.txt.
"""
import hashlib
import sys
from pathlib import Path

import lightning as L
import torch

from facerec.data import FaceDataModule, NoAugment, RecordDataset


def image_digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


class RecordSeen(L.LightningModule):
    def __init__(self, out_dir: Path):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.out_dir = out_dir
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        images, _ = batch
        self.seen += [image_digest(image) for image in images]
        return self.weight * images.mean()

    def on_train_epoch_end(self) -> None:
        (self.out_dir / f"rank{self.global_rank}.txt").write_text("\n".join(self.seen))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    root, num_classes, out_dir = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    data = FaceDataModule(
        num_classes, RecordDataset(root, num_classes, augment=NoAugment()), batch_size=5, num_workers=2, drop_last=False
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(RecordSeen(out_dir), datamodule=data)
