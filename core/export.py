"""`tuneport export`: a tuned result merged into its base model, written in the family's official layout.

LoRA is merged into the base weights (peft's `merge_and_unload`); a P-tuning v2 result becomes the
checkpoint with `pre_seq_len` and its prefix encoder; a full fine-tune is rewritten as it is. The folder
is written into a temporary folder beside `--out` and renamed at the end; `export.json` records the
sha256 of every file, which is also printed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from ..models import CheckpointError, family_for
from .data import file_sha256

EXPORT_RECORD = "export.json"
DTYPES = ("fp32", "bf16", "fp16")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def export(model: Path, adapter: Optional[Path], out: Path, dtype: str = "fp32", overwrite: bool = False) -> dict:
    """Merge `adapter` into the base checkpoint `model` and write the official layout to `out`.

    Args:
        model: the base checkpoint folder.
        adapter: a run's `adapter/` folder (LoRA, P-tuning v2 or full), or None to re-export the base.
        out: the new folder.
        dtype: the exported weights' dtype: fp32, bf16 or fp16.
        overwrite: replace `out` when it holds an earlier export (never another folder).

    Returns:
        The export record (also written to `out/export.json`): sources, dtype and each file's sha256.

    Raises:
        CheckpointError: a bad model or adapter, an unknown dtype, or an `out` that may not be replaced.
    """
    import torch

    from ..backends.torch_runtime import load_tuned_model

    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype}: not one of {', '.join(DTYPES)}")
    if out.exists():
        if not overwrite:
            raise CheckpointError(f"--out {out}: already exists; choose a new folder, or pass --overwrite to replace "
                                  "an earlier export")
        if not (out / EXPORT_RECORD).is_file():
            raise CheckpointError(f"--out {out}: is not an earlier tuneport export (no {EXPORT_RECORD}); tuneport "
                                  "replaces only what it wrote: choose a new folder")
    family = family_for(model)
    if family.save_official is None:
        raise CheckpointError(f"{model}: exporting {family.model_type} models is not supported")
    tuned = load_tuned_model(model, adapter, "cpu", dtype=torch.float32)
    if hasattr(tuned, "merge_and_unload"):  # a peft LoRA model
        tuned = tuned.merge_and_unload()
    tuned = tuned.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        family.save_official(tuned, tmp)
        for name in TOKENIZER_FILES:
            if (model / name).is_file():
                shutil.copy(model / name, tmp / name)
        record = {"tool": "tuneport", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": str(model.resolve()),
                  "adapter": str(adapter.resolve()) if adapter else None, "dtype": dtype,
                  "sha256": {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}}
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2))
        if out.exists():  # an earlier export (checked above): replaced only now that the new one is complete
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record
