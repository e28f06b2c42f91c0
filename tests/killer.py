"""`python tests/killer.py MODE AT tuneport-args...`: runs the tuneport CLI and SIGKILLs itself, for the
resume tests. MODE step: right after optimizer step AT; MODE checkpoint: in the middle of writing checkpoint
AT (its files written, not yet renamed); MODE reference: right after the reference pass (objective.
precompute_reference) has written its part number AT (from 1). Under a launcher with KILL_RANK=N, only rank N kills itself."""

import os
import signal
import sys

from tuneport.core import checkpoints, cli, trainer

mode, at = sys.argv[1], int(sys.argv[2])
if os.environ.get("KILL_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
    pass  # another rank is the one to die
elif mode == "step":
    original = trainer.train

    def train(*args, **kwargs):
        kwargs["on_step"] = lambda record: record["step"] == at and os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    trainer.train = train
elif mode == "reference":
    original_part, written = trainer.write_reference_part, []

    def write_reference_part(path, logps):
        original_part(path, logps)
        written.append(path)
        if len(written) == at:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.write_reference_part = write_reference_part
else:
    original_write = checkpoints.write_state

    def write_state(folder, state):
        if state["step"] == at:
            (folder / "trainer_state.json").write_text('{"step": ')
            os.kill(os.getpid(), signal.SIGKILL)
        original_write(folder, state)

    checkpoints.write_state = write_state
sys.exit(cli.main(sys.argv[3:]))
