"""Training glue: the LightningModule, its callbacks, checkpoints, launch checks, cluster and
logger helpers, optimizers, and `train(cfg)` behind train.py."""
