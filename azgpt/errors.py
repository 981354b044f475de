"""Exceptions the command line turns into one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import signal


class AzGPTError(Exception):
    """A problem the user can fix (bad path, bad option, inconsistent files).

    The command line prints its message without a traceback and exits non-zero (``exit_code``, else 2).
    """


class TrainingInterrupted(Exception):
    """Training stopped on a signal after a complete optimizer step, with a checkpoint saved there.

    ``exit_code`` follows the shell's convention for death by that signal: 143 for SIGTERM, 130 for SIGINT.
    """

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        self.signum = int(signum)
        self.step = step
        self.checkpoint = checkpoint
        self.exit_code = 128 + self.signum
        super().__init__(f"stopped by {signal.Signals(self.signum).name} after optimizer step {step}; "
                         f"checkpoint saved to {checkpoint} (continue with --ckpt_path last)")
