"""`tuneport export`: a tuned result merged into its base model, written in the family's official layout.

LoRA (and DoRA, AdaLoRA, IA3) is merged into the base weights (peft's `merge_and_unload`); prompt-side peft
methods cannot merge and are refused; a P-tuning v2 result becomes the
checkpoint with `pre_seq_len` and its prefix encoder; a full fine-tune is rewritten as it is. The folder
is written into a temporary folder beside `--out` and renamed at the end; `export.json` records the
sha256 of every file, which is also printed.

`--format onnx` writes the same model as an ONNX graph of one generation step with its KV cache, checks
it with `onnx.checker`, and compares onnxruntime with torch on a left-padded prompt and a cached step
(the largest difference goes into `export.json`). `onnx_generate` decodes it without torch.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path
from typing import Optional

from ..frameworks import framework
from ..models import TEMPLATE_FILE, CheckpointError, family_for
from .config import DTYPES
from .data import file_sha256
from .onnx_generate import MODEL_FILE, empty_cache, onnx_generate, open_session, step
from .checkpoints import atomic_folder
from .rundir import check_writable, writing
from ..backends import open_backend

__all__ = ["export", "onnx_generate", "compare_onnx"]

EXPORT_RECORD = "export.json"
FORMATS = ("safetensors", "onnx")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
WRITE_FIX = "free disk space, or choose a writable --out"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   TEMPLATE_FILE)
# How the base folder's release code (its family's `release_code`) went into the export.
RELEASE, COPIED, SKIPPED = "a published release's: copied", "copied (--copy-code)", "skipped"


def release_code(model: Path, published: dict[str, frozenset[str]], copy_code: bool) -> dict[str, tuple[str, str]]:
    """The base folder's release code files (engines that load the export with trust_remote_code run them)
    and what export does with each: {name: (sha256, RELEASE | COPIED | SKIPPED)}. A file is copied when its
    sha256 is a published version's, or with `copy_code`; any other file of the folder never is."""
    found = {}
    for name, versions in published.items():
        if (model / name).is_file():
            digest = file_sha256(model / name)
            found[name] = digest, RELEASE if digest in versions else COPIED if copy_code else SKIPPED
    return found


def export(model: Path, adapter: Optional[Path], out: Path, dtype: str = "fp32", overwrite: bool = False,
           fmt: str = "safetensors", copy_code: bool = False) -> dict:
    """Merge `adapter` into the base checkpoint `model` and write the official layout to `out`.

    Args:
        model: the base checkpoint folder.
        adapter: a run's `adapter/` folder (LoRA, P-tuning v2 or full), or None to re-export the base.
        out: the new folder.
        dtype: the exported weights' dtype: fp32, bf16 or fp16.
        overwrite: replace `out` when it holds an earlier export (never another folder).
        fmt: "safetensors" (the official layout) or "onnx" (fp32 only).
        copy_code: also copy release code files that are no published version (`release_code`).

    Returns:
        The export record (also written to `out/export.json`): sources, dtype, format, each file's
        sha256, what became of the release code (`code`: {name: {"sha256", "action"}}), and for ONNX the
        largest difference from torch.

    Raises:
        CheckpointError: a bad model or adapter, an unknown dtype, or an `out` that may not be replaced.
    """
    import torch

    torch_framework = framework("torch")

    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype}: not one of {', '.join(DTYPES)}")
    if fmt not in FORMATS:
        raise CheckpointError(f"--format {fmt}: not one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        if dtype != "fp32":
            raise CheckpointError(f"--dtype {dtype}: --format onnx writes fp32 only (the precision checked against "
                                  "torch); drop --dtype")
        missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise CheckpointError(f"--format onnx needs {', '.join(missing)}: pip install 'tuneport[onnx]' (with "
                                  "the mindspore extra in the same command if you use it)")
    if out.exists():
        if not overwrite:
            raise CheckpointError(f"--out {out}: already exists; choose a new folder, or pass --overwrite to replace "
                                  "an earlier export")
        if not (out / EXPORT_RECORD).is_file():
            raise CheckpointError(f"--out {out}: is not an earlier tuneport export (no {EXPORT_RECORD}); tuneport "
                                  "replaces only what it wrote: choose a new folder")
    kept = "the earlier export there is unchanged" if out.exists() else "nothing was written there"
    check_writable(out, f"--out {out}", WRITE_FIX)  # before the model loads
    family = family_for(model)
    family.require("export" if fmt == "safetensors" else "onnx", f"tuneport export --model {model} --format {fmt}")
    writer = family.save_official if fmt == "safetensors" else family.export_onnx
    loaded = torch_framework.build_tuned_model(model, None, open_backend("cpu")[1], "load", torch.float32,
                                               adapter=adapter)
    tuned = loaded.method.merged(loaded.model) if loaded.method else loaded.model
    if tuned is None:
        raise CheckpointError(f"--adapter {adapter}: its method adds virtual tokens before the input and cannot be "
                              f"merged into the weights; use it as it is: tuneport serve --model {model} --adapter "
                              f"{adapter}")
    tuned = tuned.to(torch_framework.DTYPES[dtype])

    # An earlier export (checked above) is replaced only once the new one is complete.
    with writing(f"--out {out}", kept, WRITE_FIX), atomic_folder(out) as tmp:
        writer(tuned, tmp if fmt == "safetensors" else tmp / MODEL_FILE)
        checks = compare_onnx(tuned, tmp) if fmt == "onnx" else {}
        code = release_code(model, family.release_code, copy_code) if fmt == "safetensors" else {}
        copied = [name for name, (_, action) in code.items() if action != SKIPPED]
        for name in [*TOKENIZER_FILES, *copied]:
            if (model / name).is_file():
                shutil.copy(model / name, tmp / name)
        if adapter is not None and (adapter / TEMPLATE_FILE).is_file():  # the template the run trained with
            shutil.copy(adapter / TEMPLATE_FILE, tmp / TEMPLATE_FILE)
        record = {"tool": "tuneport", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "model": str(model.resolve()), "adapter": str(adapter.resolve()) if adapter else None,
                  "dtype": dtype, "format": fmt, **checks,
                  "code": {name: {"sha256": digest, "action": action} for name, (digest, action) in code.items()},
                  "sha256": {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}}
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2))
    return record


def compare_onnx(tuned, folder: Path) -> dict:
    """Check folder/model.onnx with `onnx.checker`, then run onnxruntime and torch on the same inputs.

    The inputs: two rows of random ids (the first left-padded by 3), then one cached step. Returns
    `{"onnx_max_abs_diff": largest |difference| of the logits}`.
    """
    import numpy as np
    import onnx
    import torch

    onnx.checker.check_model(str(folder / MODEL_FILE), full_check=True)
    session = open_session(folder)
    vocab = tuned.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 8), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    nxt = torch.randint(0, vocab, (2, 1), generator=generator)
    step_mask = torch.cat((mask, mask.new_ones(2, 1)), dim=1)
    with torch.no_grad():
        prompt = tuned(input_ids=ids, attention_mask=mask, use_cache=True)
        cached = tuned(input_ids=nxt, attention_mask=step_mask, past_key_values=prompt.cache, use_cache=True)
    first, cache = step(session, ids.numpy(), mask.numpy(), empty_cache(session, 2))
    second, _ = step(session, nxt.numpy(), step_mask.numpy(), cache)
    real = mask.numpy().astype(bool)  # a padded position's logits are defined by no one (and never read)
    diff = max(float(np.abs(first - prompt.logits.numpy())[real].max()),
               float(np.abs(second - cached.logits.numpy()).max()))
    return {"onnx_max_abs_diff": diff}
