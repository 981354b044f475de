"""Stage 2, training: the LightningModule, the Trainer azgpt builds, and what keeps a run trustworthy
(atomic checkpoints, graceful stop, numerical guard, precision choice, callbacks)."""
