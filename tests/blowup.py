"""A callback that makes a training blow up, for the tests of what survives a divergence."""

import lightning as L


class RaiseLearningRate(L.Callback):
    """Sets every learning rate to `lr` from step `after_step` on: a blow-up after the checkpoints written before.

    Runs add it with `+callbacks.blowup._target_=blowup.RaiseLearningRate` and PYTHONPATH=tests.
    """

    def __init__(self, after_step: int, lr: float = 1e30):
        self.after_step, self.lr = after_step, lr

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.after_step:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self.lr
