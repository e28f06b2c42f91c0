"""`tuneport parity`: the same batch forward and backward on two sides, compared block by block.

A side is a (device, framework, dtype): `--a cpu --b npu`, `--framework-b mindspore`, `--dtype-b bf16`.
Each side loads the model as a run trains it (frozen base in the compute dtype, trained weights in float32,
the backend's autocast and kernels), runs one fixed batch forward and backward, and captures, in forward
order: the embedding (the first block's input), every block's output (`layers.N`), the final norm (the
output layer's input), the logits and the loss; then the gradient of every trained parameter
(`grad:NAME`, peft's names without the adapter name). The trained parameters are the `--adapter`'s; with no
adapter, a fixed synthetic LoRA (`SyntheticLora`: r 4 on every linear layer of every block, weights drawn
from each parameter's name, so every framework builds the same one and no gradient is zero) stands in for
the adapter a run would train, so every block's backward is compared too. The framework-specific
capture is each framework's (`frameworks/torch/parity.py`, `frameworks/mindspore/parity.py`); this module is framework-neutral.

Side A is the reference. Each row's error is relative: ||B - A|| / ||A||, both cast to float32 and computed
in float64 (0 when both are zero, infinite when only A is; NaN or infinity on either side fails). Each row
passes when its error is at most its tolerance, set by the less precise side's dtype (`tolerance`):

- fp32: 1e-4 on every row, the project's golden tolerance between implementations (golden/README.md).
  Correct fp32 implementations differ by reduction order and fused kernels only: fp32's unit roundoff is
  2^-24 (6e-8), about 1e-6 after a long dot product; 1e-4 leaves two orders of magnitude for depth
  (torch and MindSpore on the golden model differ by about 1e-6 on every row).
- bf16 and fp16: 8 u sqrt(n + 1) for forward rows and 16 u sqrt(n + 1) for gradients, where u is the
  dtype's unit roundoff (bf16 keeps 8 significant bits: u = 2^-8 = 3.9e-3; fp16 11: u = 2^-11 = 4.9e-4) and
  n the number of blocks the row has gone through: 0 for the embedding, N + 1 for block N's output, all L
  blocks for the final norm, logits and loss, and for block N's gradients the whole forward and backward
  down to block N, 2L - N. Why: every rounding is off by up to u; a block rounds its activations about ten
  times (norms, projections, attention, SwiGLU, residual adds), and independent roundings add in
  quadrature, so the error after n blocks grows like sqrt(n), not like n; a gradient multiplies rounded
  activations by rounded upstream gradients and sums a few tokens' products, with less averaging than an
  activation, so it gets twice the units. Measured with torch bf16 autocast against fp32 on the CPU (random
  weights): at ChatGLM3-6B's width (hidden 4096, its 0.02 initialisation, 6 blocks) block outputs go from
  1.2e-2 (block 0) to 2.6e-2 (block 5), at most 2.6 u sqrt(n + 1), and LoRA gradients reach 5.8e-2,
  4.5 u sqrt(n + 1); 28 narrower blocks (hidden 256) stay within 1.5 u sqrt(n + 1). A small Qwen2 with
  large weights (std 0.2: sharp attention, 3 blocks) reaches 3.4 u forward and 8.8 u in the attention's
  gradients. So a correct bf16 run passes with room to spare (a flat 2e-2 fails correct 6B-wide runs from
  block 3 on), while a wrong kernel still fails where it first runs: swapping rotary's pairs moves the
  golden model's block 0 by 7.6e-2 against a bf16 tolerance there of 4.4e-2 (and against 1e-4 in fp32,
  where kernels are best checked). These are random models; a trained one whose attention amplifies
  perturbations more (an 8-block Qwen2 with std 0.2 weights reaches 21 u in gradients) can fail gradient
  rows in bf16 while its forward rows pass: read those against its fp32 report. fp16 runs scale the loss by
  2^16 before backward (the first step of dynamic loss scaling) and unscale the gradients.

The report names the first drifting row: the first failing forward row in forward order (its block is where
to look); when every forward row passes, the failing gradient deepest in the model (backward runs from the
last block down, so that is where backward first went wrong).

Across machines: `--save-reference FILE` runs side A only and writes its rows, the batch and what they came
from (model config hash, adapter hash, side, versions); `--against FILE` takes side A from FILE and runs
side B on FILE's batch. The report is the one a single process gives. A reference from another model,
adapter or batch is refused.

Outputs in `--out` (default `parity/`): `parity.json` (every row, the verdict, the first drift, both sides,
the model, adapter and batch) and `parity.png` (error by layer, log scale, with the tolerance lines; skipped
with a note when matplotlib is missing). tuneport overwrites only a parity.json it wrote, and the files
that one lists. Exit status: 0 every row passes, 1 some row fails (after the report is written), 2 bad input.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from ..frameworks import adapter_problem, framework, get_runtime
from .config import DTYPES, FRAMEWORKS
from .errors import BackendUnavailable, ParityError, PrecisionError, RecipeError
from .methods import PREFIX_CONFIG, PREFIX_WEIGHTS
from .precision import resolve_precision
from .versions import installed, tuneport_version
from ..models import CheckpointError, family_for, read_json
from .rundir import FolderError, atomic_write_text, check_writable, read_json_object, writing

if TYPE_CHECKING:
    import numpy as np

HELP = ("compare one batch forward and backward on two devices, frameworks or precisions, block by block "
        "(exit 1 when a row drifts past its dtype's tolerance)")

PRECISION_RANK = {"fp32": 0, "fp16": 1, "bf16": 2}  # a higher rank rounds more coarsely
# Tolerances (the reasoning and the measurements behind them are in the module docstring): fp32 a flat
# relative error; bf16 and fp16 so many unit roundoffs times sqrt(blocks gone through + 1).
FP32_TOLERANCE = 1e-4
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11}
FORWARD_UNITS, GRADIENT_UNITS = 8, 16
FP16_LOSS_SCALE = 2.0**16
REPORT, PLOT = "parity.json", "parity.png"
WRITE_FIX = "free disk space, or choose a writable --out"
REFERENCE_KIND = "tuneport-parity-reference"
REFERENCE_FORMAT = 1
# config.json keys that say how a file was written, not what the model is (a re-saved copy changes them).
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "architectures", "auto_map", "torch_dtype",
                        "dtype")
SEEDED_BATCH = (2, 16)  # rows, tokens: row 1 right-padded by 4 as training batches are; first 6 tokens unlabeled
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def embedding_rows(config: dict) -> int:
    """The model's embedding rows from its config.json: `vocab_size`, as transformers' configs name it (ChatGLM3's
    config.json has it too, beside its own name for the same rows)."""
    return int(config.get("vocab_size") or 0)


@dataclass(frozen=True)
class Side:
    """One side of the comparison."""

    device: str  # cpu, cuda, npu, cuda:1, or any registered backend
    framework: str  # torch | mindspore
    dtype: str  # fp32 | bf16 | fp16

    def __str__(self) -> str:
        return f"{self.device} {self.framework} {self.dtype}"


@dataclass(frozen=True)
class SyntheticLora:
    """The LoRA trained when no `--adapter` is given: rank `r` on `targets` (every linear layer of every
    block), A ~ N(0, 1/in_features) and B ~ N(0, 0.02^2), each drawn from a generator seeded by the
    parameter's name. Unlike peft's initialisation, B is not zero, so A's gradients are not zero either;
    B's small scale keeps the adapter's change to each layer small, as after some training."""

    r: int
    alpha: float
    targets: tuple[str, ...]

    def weight(self, name: str, shape: tuple[int, ...]) -> "np.ndarray":
        """The float32 value of LoRA parameter `name` (peft's or MindSpore's name) of `shape`."""
        import numpy as np

        name = canonical(name)
        seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        std = 1.0 / math.sqrt(shape[1]) if ".lora_A." in name else 0.02
        return (np.random.default_rng(seed).standard_normal(shape) * std).astype(np.float32)

    def identity(self) -> dict:
        return {"kind": "synthetic-lora", "r": self.r, "alpha": self.alpha, "targets": sorted(self.targets)}


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # forward | gradient
    layer: Optional[int]
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tolerance

    def record(self) -> dict:
        error = self.error if math.isfinite(self.error) else str(self.error)  # JSON has no inf or nan
        return {"row": self.name, "kind": self.kind, "layer": self.layer, "error": error,
                "tolerance": self.tolerance, "pass": self.passed}


# --- what is compared --------------------------------------------------------------------------------
def canonical(name: str) -> str:
    """A trained parameter's name as both frameworks agree on it: peft's, without `base_model.model.` and the
    adapter's name (`...query_key_value.lora_A.default.weight` -> `...query_key_value.lora_A.weight`)."""
    name = name.removeprefix("base_model.model.")
    return ".".join(part for part in name.split(".") if part != "default")


def layer_of(row: str) -> Optional[int]:
    match = LAYER.search(row)
    return int(match.group(1)) if match else None


def relative_error(b: "np.ndarray", a: "np.ndarray") -> float:
    """||b - a|| / ||a|| in float64 (0 when both are zero, inf when only `a` is)."""
    import numpy as np

    a64, b64 = a.astype(np.float32).astype(np.float64).ravel(), b.astype(np.float32).astype(np.float64).ravel()
    den, num = float(np.sqrt(np.dot(a64, a64))), float(np.sqrt(np.dot(b64 - a64, b64 - a64)))
    if not (math.isfinite(den) and math.isfinite(num)):
        return math.nan
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def tolerance_dtype(a: Side, b: Side) -> str:
    return max(a.dtype, b.dtype, key=PRECISION_RANK.__getitem__)


def tolerance(dtype: str, kind: str, blocks: int) -> float:
    """The relative error a row of `kind` (forward or gradient) may have in `dtype` after going through
    `blocks` blocks: FP32_TOLERANCE in fp32, else UNITS * u * sqrt(blocks + 1)."""
    if dtype == "fp32":
        return FP32_TOLERANCE
    units = GRADIENT_UNITS if kind == "gradient" else FORWARD_UNITS
    return units * UNIT_ROUNDOFF[dtype] * math.sqrt(blocks + 1)


def tolerance_rule(dtype: str) -> str:
    if dtype == "fp32":
        return f"{FP32_TOLERANCE:g} on every row"
    return (f"u = {UNIT_ROUNDOFF[dtype]:.3g}; {FORWARD_UNITS} u sqrt(n + 1) forward, {GRADIENT_UNITS} u sqrt(n + 1) "
            "gradients; n = blocks gone through (block N: N + 1; final norm, logits, loss: all; block N's "
            "gradients: 2 * blocks - N)")


def blocks_through(name: str, kind: str, layer: Optional[int], num_blocks: int) -> int:
    """How many blocks a row's value has gone through (see `tolerance`)."""
    if kind == "gradient":
        return 2 * num_blocks - (layer or 0)
    if name == "embedding":
        return 0
    return layer + 1 if layer is not None else num_blocks


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def compare(reference: dict, other: dict, dtype: str) -> list[Row]:
    """Rows of `other` against `reference` (captures with the same names), forward rows in forward order,
    then the gradients layer by layer.

    Raises:
        ParityError: the captures differ in their rows or shapes (they come from different models or adapters).
    """
    if set(reference) != set(other):
        only_a, only_b = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
        raise ParityError(f"the sides captured different rows (only A: {only_a[:3]}, only B: {only_b[:3]}); "
                          "they run different models or adapters")
    forward = [n for n in reference if not n.startswith("grad:")]
    num_blocks = sum(layer_of(n) is not None for n in forward)
    gradients = sorted((n for n in reference if n.startswith("grad:")), key=_natural)
    rows = []
    for name in forward + gradients:
        if reference[name].shape != other[name].shape:
            raise ParityError(f"row {name}: shape {list(other[name].shape)} on side B, {list(reference[name].shape)} "
                              "on side A; the sides run different models")
        kind, layer = "gradient" if name.startswith("grad:") else "forward", layer_of(name)
        rows.append(Row(name, kind, layer, relative_error(other[name], reference[name]),
                        tolerance(dtype, kind, blocks_through(name, kind, layer, num_blocks))))
    return rows


def first_drift(rows: list[Row]) -> Optional[dict]:
    """Where to look first: the first failing forward row in forward order; else the failing gradient
    deepest in the model (backward's first); None when every row passes."""
    for row in rows:
        if row.kind == "forward" and not row.passed:
            return {"row": row.name, "layer": row.layer, "direction": "forward"}
    failing = [r for r in rows if r.kind == "gradient" and not r.passed]
    if not failing:
        return None
    row = max(failing, key=lambda r: -1 if r.layer is None else r.layer)  # the first of the deepest layer
    return {"row": row.name, "layer": row.layer, "direction": "backward"}


# --- inputs: model, adapter, batch -----------------------------------------------------------------------
def model_identity(model_dir: Path) -> dict:
    """The model's type and the sha256 of its config.json without the keys that say how it was saved."""
    config = read_json(model_dir / "config.json")
    kept = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
    return {"model_type": config.get("model_type"), "config_sha256": digest}


def _weights_sha256(file: Path) -> str:
    """The sha256 of a safetensors file's tensors (canonical names, float32 values), whoever wrote it."""
    import numpy as np
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        weights = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot be read ({e}); copy the adapter again") from None
    digest = hashlib.sha256()
    for name in sorted(weights, key=canonical):
        value = np.ascontiguousarray(weights[name], dtype=np.float32)
        digest.update(f"{canonical(name)}{list(value.shape)}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def adapter_identity(adapter: Optional[Path], lora: SyntheticLora) -> dict:
    """What the trained weights are: the synthetic LoRA, or the adapter's kind and the sha256 of its weights.

    Raises:
        ParityError: not a folder of a tuned result tuneport can compare.
    """
    if adapter is None:
        return lora.identity()
    if not adapter.is_dir():
        raise ParityError(f"--adapter {adapter}: no such folder; pass the adapter/ folder of a run")
    if (adapter / "config.json").is_file():
        raise ParityError(f"--adapter {adapter}: a full fine-tune (a checkpoint folder); compare it as "
                          f"--model {adapter}")
    if (adapter / PREFIX_CONFIG).is_file():
        return {"kind": "ptuning_v2", "sha256": _weights_sha256(adapter / PREFIX_WEIGHTS)}
    if not (adapter / "adapter_config.json").is_file():
        raise ParityError(f"--adapter {adapter}: not a tuned result; expected adapter_config.json (a PEFT adapter) "
                          "or prefix_config.json (P-tuning v2)")
    config = read_json(adapter / "adapter_config.json")
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise ParityError(f"--adapter {adapter}: no adapter_model.safetensors (an adapter saved as pickle .bin: "
                          "save it again with safetensors)")
    return {"kind": str(config.get("peft_type", "?")).lower(), "sha256": _weights_sha256(weights)}


def seeded_batch(model_dir: Path) -> dict:
    """A fixed batch within the model's vocabulary: SEEDED_BATCH ids drawn with seed 0, row 1 right-padded
    (pad id, mask 0, label -100) as training batches are, the first 6 tokens without labels as a prompt."""
    import numpy as np

    config = read_json(model_dir / "config.json")
    vocab = embedding_rows(config)
    if vocab < 2:
        raise ParityError(f"--model {model_dir}: config.json gives no vocabulary size; pass --batch FILE")
    rows, tokens = SEEDED_BATCH
    ids = np.random.default_rng(0).integers(1, vocab, size=(rows, tokens), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, tokens - 4:] = 0
    ids[mask == 0] = int(config.get("pad_token_id") or 0)
    labels = ids.copy()
    labels[:, :6] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def read_batch(file: Path, model_dir: Path) -> dict:
    """The batch in a safetensors file: input_ids and labels [batch, seq] (-100: no loss), and optionally
    attention_mask (1 on tokens, 0 at padding); golden/chatglm3/cases.safetensors is one.

    Raises:
        ParityError: unreadable, missing or misshapen arrays, ids past the vocabulary, or no label to learn.
    """
    import numpy as np
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ParityError(f"--batch {file}: cannot be read as safetensors ({e})") from None
    problems = [f"no {key}" for key in ("input_ids", "labels") if key not in arrays]
    if problems:
        raise ParityError(f"--batch {file}: {', '.join(problems)}; the file needs input_ids and labels "
                          "[batch, seq] (and optionally attention_mask)")
    ids = arrays["input_ids"].astype(np.int64)
    batch = {"input_ids": ids, "labels": arrays["labels"].astype(np.int64),
             "attention_mask": arrays.get("attention_mask", np.ones_like(ids)).astype(np.int64)}
    config = read_json(model_dir / "config.json")
    vocab = embedding_rows(config)
    if ids.ndim != 2 or any(v.shape != ids.shape for v in batch.values()):
        problems.append("input_ids, labels and attention_mask must share one [batch, seq] shape, got "
                        + ", ".join(f"{k} {list(v.shape)}" for k, v in batch.items()))
    elif vocab and (ids.min() < 0 or ids.max() >= vocab):
        problems.append(f"input_ids run from {ids.min()} to {ids.max()}, past the model's vocabulary of {vocab}")
    elif not (batch["labels"][:, 1:] != -100).any():
        problems.append("every label after the first token is -100: there is no loss to compare")
    if problems:
        raise ParityError(f"--batch {file}: {'; '.join(problems)}")
    return batch


def batch_identity(batch: dict, source: str) -> dict:
    digest = hashlib.sha256()
    for key in ("input_ids", "labels", "attention_mask"):
        digest.update(f"{key}{list(batch[key].shape)}".encode())
        digest.update(batch[key].astype("<i8").tobytes())
    return {"source": source, "shape": list(batch["input_ids"].shape),
            "label_tokens": int((batch["labels"][:, 1:] != -100).sum()), "sha256": digest.hexdigest()}


def versions(side: Side) -> dict:
    """Versions of what computed a side (read from package metadata: nothing is imported)."""
    found = {"tuneport": tuneport_version()}
    names = [side.framework] + (["torch_npu", "torch-npu"] if side.framework == "torch" and
                                side.device.startswith("npu") else [])
    for name in names:
        if installed(name):
            found[name.replace("-", "_")] = installed(name)
    return found


# --- running a side ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    """A side ready to run: its device object (set up on first use) and capture function."""

    side: Side
    device: object
    capture: Callable[..., dict]


def _capture(prepared: Prepared, model_dir, adapter, batch, lora, objective: str = "sft") -> dict:
    index = int(prepared.side.device.partition(":")[2] or 0)
    return framework(prepared.side.framework).capture(prepared.device, index, prepared.side.dtype, model_dir,
                                                      adapter, batch, lora, _scale(prepared), objective=objective)


def _scale(prepared: Prepared) -> float:
    return FP16_LOSS_SCALE if prepared.side.dtype == "fp16" else 1.0




def prepare(side: Side, flag: str) -> Prepared:
    """Check that `side` can run here (device, framework, dtype), importing nothing heavy it does not need.

    Raises:
        ParityError: it cannot, with the reason and the fix, prefixed by the option (`--a`, `--b`).
    """
    try:
        choice = get_runtime(side.framework, side.device)
        resolve_precision(side.dtype, choice.device_name, choice.device.capabilities)
    except (RecipeError, BackendUnavailable, PrecisionError) as e:
        raise ParityError(f"--{flag} {side}: {e}") from None
    return Prepared(side, choice.device, _capture)


def run_side(prepared: Prepared, model_dir: Path, adapter: Optional[Path], batch: dict, lora: SyntheticLora,
             objective: str = "sft") -> dict:
    """The side's captures (float32 arrays of at least one dimension, as a reference file holds them: the
    loss has shape [1]), gradients under their canonical names. `objective` dpo: the batch's rows are pairs
    (its first half chosen, its second rejected), and the loss is DPO's against the adapter-disabled model."""
    import numpy as np

    prepared.device.setup()
    captured = prepared.capture(prepared, model_dir, adapter, batch, lora, objective)
    return {(f"grad:{canonical(n[5:])}" if n.startswith("grad:") else n): np.atleast_1d(v)
            for n, v in captured.items()}


# --- the reference file --------------------------------------------------------------------------------
def _is_reference(file: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:
            return (f.metadata() or {}).get("tuneport") == REFERENCE_KIND
    except Exception:  # anything unreadable is not ours
        return False


def _unwritable(path: Path, output: str, fix: str) -> list[str]:
    """[the problem] when `path` cannot be written (checked before either side runs), else []."""
    try:
        check_writable(path, output, fix)
    except FolderError as e:
        return [str(e)]
    return []


def save_reference(file: Path, captured: dict, batch: dict, meta: dict) -> None:
    """Write side A's rows, the batch and `meta` as one safetensors file, replacing it in one step."""
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {f"row/{name}": np.ascontiguousarray(value) for name, value in captured.items()}
    tensors.update({f"batch/{key}": np.ascontiguousarray(value) for key, value in batch.items()})
    meta = {**meta, "rows": list(captured)}
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"tuneport": REFERENCE_KIND, "meta": json.dumps(meta)})
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_reference(file: Path) -> tuple[dict, dict, dict]:
    """(meta, captures in their original order, batch) from a `--save-reference` file.

    Raises:
        ParityError: missing, unreadable, or not a parity reference.
    """
    from safetensors import safe_open

    if not file.is_file():
        raise ParityError(f"--against {file}: no such file; write it with --save-reference on the other machine")
    try:
        with safe_open(str(file), framework="numpy") as f:
            metadata = f.metadata() or {}
            if metadata.get("tuneport") != REFERENCE_KIND:
                raise ParityError(f"--against {file}: not a tuneport parity reference; write one with "
                                  "tuneport parity --save-reference FILE")
            meta = json.loads(metadata["meta"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except ParityError:
        raise
    except Exception as e:  # a damaged or truncated file, whatever the library raises
        raise ParityError(f"--against {file}: cannot be read ({type(e).__name__}: {e}); copy it again") from None
    if meta.get("format") != REFERENCE_FORMAT:
        raise ParityError(f"--against {file}: reference format {meta.get('format')}; this tuneport reads format "
                          f"{REFERENCE_FORMAT}: write it again with this version")
    captured = {name: tensors[f"row/{name}"] for name in meta["rows"]}
    batch = {key[len("batch/"):]: value for key, value in tensors.items() if key.startswith("batch/")}
    return meta, captured, batch


def check_reference(file: Path, meta: dict, model: dict, adapter: dict, batch: Optional[dict]) -> None:
    """Refuse a reference made from another model, adapter or batch than this run's.

    Raises:
        ParityError: naming what differs and the fix.
    """
    theirs = meta["model"]
    if theirs["config_sha256"] != model["config_sha256"]:
        raise ParityError(f"--against {file}: made with another model ({theirs['model_type']}, config sha256 "
                          f"{theirs['config_sha256'][:12]}) than --model ({model['model_type']}, config sha256 "
                          f"{model['config_sha256'][:12]}); compare the same model on both machines")
    if meta["adapter"] != adapter:
        raise ParityError(f"--against {file}: made with adapter {_short(meta['adapter'])}, this run has "
                          f"{_short(adapter)}; pass the same --adapter (or none) on both machines")
    if batch is not None and batch["sha256"] != meta["batch"]["sha256"]:
        raise ParityError(f"--against {file}: made with another batch than --batch {batch['source']}; drop "
                          "--batch: the reference carries its batch")


def _short(adapter: dict) -> str:
    if "sha256" in adapter:
        return f"{adapter['kind']} (sha256 {adapter['sha256'][:12]})"
    return f"{adapter['kind']} r={adapter['r']} on {', '.join(adapter['targets'])}"


# --- outputs -------------------------------------------------------------------------------------------
def _ours(out: Path) -> Optional[dict]:
    """The parity.json tuneport wrote in `out`, or None."""
    report = read_json_object(out / REPORT)
    return report if report.get("tool") == "tuneport" and report.get("report") == "parity" else None


def output_problems(out: Path) -> list[str]:
    """Why the report may not be written into `out` (a file, or a parity.json/parity.png tuneport did not
    write); empty when it may."""
    if out.exists() and not out.is_dir():
        return [f"--out {out}: is a file; give a folder for {REPORT} and {PLOT}"]
    ours = _ours(out)
    owned = set(ours.get("files", [])) if ours else set()
    foreign = [name for name in (REPORT, PLOT) if (out / name).exists() and not (ours and (name == REPORT or
                                                                                      name in owned))]
    if foreign:
        return [f"--out {out}: holds {' and '.join(foreign)} that tuneport did not write; tuneport never "
                "overwrites your files: choose another --out"]
    return []


def plot(report: dict) -> Optional[bytes]:
    """parity.png as bytes (error by layer, log scale, tolerance curves, failing rows circled in red), or None
    without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    floor = 1e-12  # an exact match has no logarithm: drawn at the floor

    def value(row):
        return max(float(row["error"]), floor)  # "inf" and "nan" parse as floats; nan is not drawn

    rows = report["rows"]
    forward = [r for r in rows if r["kind"] == "forward"]
    names = ["emb" if r["row"] == "embedding" else str(r["layer"]) if r["layer"] is not None else
             r["row"].replace("final_norm", "norm") for r in forward]
    position = {r["row"]: i for i, r in enumerate(forward)}
    fig = Figure(figsize=(max(7.0, 0.25 * len(forward)), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = range(len(forward))
    ax.semilogy(x, [value(r) for r in forward], "o-", color="C0",
                label="forward: embedding, block outputs, norm, logits, loss")
    ax.semilogy(x, [r["tolerance"] for r in forward], ":", color="C0", label="forward tolerance")
    worst: dict[int, dict] = {}  # per block, the gradient row furthest past (or nearest to) its tolerance
    for r in rows:
        if r["kind"] == "gradient" and r["layer"] is not None and f"layers.{r['layer']}" in position:
            if r["layer"] not in worst or value(r) / r["tolerance"] > value(worst[r["layer"]]) / \
                    worst[r["layer"]]["tolerance"]:
                worst[r["layer"]] = r
    if worst:
        layers = sorted(worst)
        xs = [position[f"layers.{i}"] for i in layers]
        ax.semilogy(xs, [value(worst[i]) for i in layers], "s--", color="C1",
                    label="gradients (the block's worst against its tolerance)")
        ax.semilogy(xs, [worst[i]["tolerance"] for i in layers], ":", color="C1", label="gradient tolerance")
    failing = [(position[r["row"]], value(r)) for r in forward if not r["pass"]]
    failing += [(position[f"layers.{i}"], value(r)) for i, r in worst.items() if not r["pass"]]
    if failing:
        ax.scatter(*zip(*failing), s=140, facecolors="none", edgecolors="red", zorder=3, label="past tolerance")
    ax.set_xticks(list(x), names, rotation=90 if len(forward) > 20 else 0)
    ax.set_xlabel("block")
    ax.set_ylabel("relative error ||B - A|| / ||A||")
    ax.set_title(f"A: {report['a']['side']}   B: {report['b']['side']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_outputs(out: Path, report: dict) -> list[Path]:
    """Write parity.json (first: it records what tuneport owns here) and parity.png; return what was written."""
    problems = output_problems(out)  # again: the run took a while, and the folder is the user's
    if problems:
        raise ParityError("; ".join(problems))
    out.mkdir(parents=True, exist_ok=True)
    image = plot(report)
    report["files"] = [REPORT] + ([PLOT] if image is not None else [])
    atomic_write_text(out / REPORT, json.dumps(report, indent=2) + "\n")
    written = [out / REPORT]
    if image is None:
        (out / PLOT).unlink(missing_ok=True)  # an earlier report's (checked as ours): it would be stale
        return written
    tmp = out / f".{PLOT}.tmp"
    try:
        tmp.write_bytes(image)
        os.replace(tmp, out / PLOT)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written + [out / PLOT]


def table(rows: list[Row]) -> str:
    width = max(len("row"), *(len(r.name) for r in rows))
    lines = [f"{'row':{width}s}  {'rel. error':>10s}  {'tolerance':>9s}  verdict"]
    for r in rows:
        lines.append(f"{r.name:{width}s}  {r.error:10.3e}  {r.tolerance:9.1e}  {'pass' if r.passed else 'FAIL'}")
    return "\n".join(lines)


# --- the command ---------------------------------------------------------------------------------------
def add_parity_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base checkpoint folder")
    p.add_argument("--adapter", help="a tuned result to train: a PEFT adapter (LoRA, IA3, ...) or a P-tuning v2 "
                   "folder; default: a fixed synthetic LoRA on every linear layer")
    p.add_argument("--a", metavar="DEVICE", help="side A's device, the reference: cpu, cuda, npu, ...")
    p.add_argument("--b", metavar="DEVICE", help="side B's device, compared with A")
    p.add_argument("--framework-a", choices=FRAMEWORKS, help="side A's framework (default torch)")
    p.add_argument("--framework-b", choices=FRAMEWORKS, help="side B's framework (default torch)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="both sides' compute dtype (default fp32)")
    p.add_argument("--dtype-a", choices=DTYPES, help="side A's compute dtype (overrides --dtype)")
    p.add_argument("--dtype-b", choices=DTYPES, help="side B's compute dtype (overrides --dtype)")
    p.add_argument("--batch", metavar="FILE", help="safetensors with input_ids and labels (and attention_mask); "
                   "default: a fixed seeded batch of 2 x 16 tokens")
    p.add_argument("--out", default="parity", help=f"folder for {REPORT} and {PLOT} (default ./parity)")
    p.add_argument("--save-reference", metavar="FILE", help="run side A only and save it to FILE, for --against "
                   "on another machine (with --b, compare here too)")
    p.add_argument("--against", metavar="FILE", help="take side A from a --save-reference FILE; run side B only")
    p.add_argument("--objective", choices=("sft", "dpo"), default="sft",
                   help="the loss compared: sft (default) or dpo (beta 0.1, the batch's first half of rows chosen, "
                        "the second rejected, the reference the model without its adapter; rows: per-row "
                        "log-probabilities instead of logits)")


def _sides(args: argparse.Namespace, problems: list[str]) -> tuple[Optional[Side], Optional[Side]]:
    """The sides the command line asks for (A None with --against), with the problems of the options."""
    a = b = None
    if args.against:
        if args.save_reference:
            problems.append("--against and --save-reference: one process either writes the reference or reads it")
        given = [f"--{n.replace('_', '-')}" for n in ("a", "framework_a", "dtype_a") if getattr(args, n)]
        if given:
            problems.append(f"{', '.join(given)}: with --against, side A is the reference file's; drop them")
    elif not args.a:
        problems.append("--a: missing; give side A's device (cpu, cuda, npu, ...), or --against FILE")
    else:
        a = Side(args.a.lower(), args.framework_a or "torch", args.dtype_a or args.dtype)
    if args.b:
        b = Side(args.b.lower(), args.framework_b or "torch", args.dtype_b or args.dtype)
    elif not args.save_reference:
        problems.append("--b: missing; give side B's device (cpu, cuda, npu, ...), or --save-reference FILE")
    for flag, side in (("a", a), ("b", b)):
        if side is not None and side.device == "auto":
            problems.append(f"--{flag} auto: name the device (cpu, cuda, npu, ...); a report compares two named sides")
    if a is not None and b is not None:
        if a == b:
            problems.append(f"--a and --b: both sides are {a}; change the device, --framework-b or --dtype-b")
        elif a.framework == b.framework == "mindspore" and a.device != b.device:
            problems.append("--a and --b: MindSpore binds a process to one device; compare two MindSpore devices "
                            "with --save-reference on one and --against in a second process")
    return a, b


def run_parity(args: argparse.Namespace) -> int:
    """`tuneport parity`: 0 when every row passes, 1 when one drifts, 2 on bad input (one `error:` line;
    other expected errors, such as a damaged checkpoint, reach the CLI's handler, which does the same)."""
    try:
        return _run(args)
    except ParityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    problems: list[str] = []
    side_a, side_b = _sides(args, problems)
    model_dir, adapter = Path(args.model), Path(args.adapter) if args.adapter else None
    out = Path(args.out)
    lora = identity = adapter_id = None
    try:
        family = family_for(model_dir)
        identity = model_identity(model_dir)
        lora = SyntheticLora(4, 8.0, tuple(family.linear_layers))
    except CheckpointError as e:
        problems.append(str(e))
    if adapter is not None or lora is not None:
        try:
            adapter_id = adapter_identity(adapter, lora)
        except (CheckpointError, ParityError) as e:
            problems.append(str(e))
    sides = [(flag, side) for flag, side in (("a", side_a), ("b", side_b)) if side is not None]
    if lora is not None:
        problems += [f"--framework-{flag} {side.framework}: {family.model_type} has no {side.framework} model; compare "
                     f"it with --framework-{flag} torch" for flag, side in sides if side.framework not in family.supports]
    if adapter is not None and adapter_id is not None:  # each side's framework says whether it loads the adapter
        problems += [f"--{flag} {side}: {problem}" for flag, side in sides
                     if (problem := adapter_problem(side.framework, adapter))]
    if args.save_reference:
        file = Path(args.save_reference)
        if file.exists() and not (file.is_file() and _is_reference(file)):
            problems.append(f"--save-reference {file}: exists and is not a tuneport parity reference; tuneport never "
                            "overwrites your files: choose another file")
        problems += _unwritable(file, f"--save-reference {file}", "free disk space, or choose a writable file")
    if side_b is not None:
        problems += output_problems(out) or _unwritable(out, f"--out {out}", WRITE_FIX)
    reference = None
    if args.against and not problems:
        reference = load_reference(Path(args.against))
    if problems:
        raise ParityError("; ".join(problems))

    batch_info = None
    if reference is not None:
        meta, captured_a, batch = reference
        given = batch_identity(read_batch(Path(args.batch), model_dir), args.batch) if args.batch else None
        check_reference(Path(args.against), meta, identity, adapter_id, given)
        side_a = Side(**meta["side"])
        batch_info, versions_a = meta["batch"], meta["versions"]
    else:
        batch = read_batch(Path(args.batch), model_dir) if args.batch else seeded_batch(model_dir)
        batch_info = {**batch_identity(batch, str(args.batch) if args.batch else "seeded"), "objective": args.objective}
        versions_a = versions(side_a)
    if args.objective != "sft" and batch["input_ids"].shape[0] % 2:
        raise ParityError(f"--objective {args.objective}: the batch has {batch['input_ids'].shape[0]} rows; a pair "
                          "batch holds its chosen rows, then as many rejected ones")
    if batch_info.get("objective", "sft") != args.objective:
        raise ParityError(f"--against {args.against}: made with --objective {batch_info.get('objective', 'sft')}; "
                          "run side B with the same objective")
    # Every side that runs is checked before either runs: an unusable side B costs no side A.
    prepared = {flag: prepare(side, flag) for flag, side in (("a", side_a if reference is None else None),
                                                             ("b", side_b)) if side is not None}
    if reference is None:
        captured_a = run_side(prepared["a"], model_dir, adapter, batch, lora, args.objective)
        if args.save_reference:
            meta = {"format": REFERENCE_FORMAT, "side": asdict(side_a), "versions": versions_a, "model": identity,
                    "adapter": adapter_id, "batch": batch_info}
            with writing(f"--save-reference {args.save_reference}", "nothing was written there",
                         "free disk space, or choose a writable file"):
                save_reference(Path(args.save_reference), captured_a, batch, meta)
            print(f"wrote {args.save_reference}: side A ({side_a}), {len(captured_a)} rows, batch "
                  f"{'x'.join(map(str, batch_info['shape']))} ({batch_info['source']})")
            if side_b is None:
                print(f"on the other machine: tuneport parity --model MODEL{' --adapter ADAPTER' if adapter else ''} "
                      f"--b DEVICE --against {args.save_reference}")
                return 0
    captured_b = run_side(prepared["b"], model_dir, adapter, batch, lora, args.objective)

    dtype = tolerance_dtype(side_a, side_b)
    rows = compare(captured_a, captured_b, dtype)
    drift = first_drift(rows)
    report = {
        "tool": "tuneport", "report": "parity",
        "a": {"side": str(side_a), **asdict(side_a), "versions": versions_a},
        "b": {"side": str(side_b), **asdict(side_b), "versions": versions(side_b)},
        "reference": {"file": str(args.against)} if args.against else None,
        "model": identity, "adapter": adapter_id, "batch": batch_info,
        "error": "||B - A|| / ||A|| per row, in float64",
        "tolerance": {"dtype": dtype, "rule": tolerance_rule(dtype)},
        "passed": all(r.passed for r in rows), "first_drift": drift,
        "rows": [r.record() for r in rows],
    }
    print(f"tuneport parity: A = {side_a}{f' (from {args.against})' if args.against else ''}, B = {side_b}; "
          f"{identity['model_type']} (config {identity['config_sha256'][:12]}), {_short(adapter_id)}, batch "
          f"{'x'.join(map(str, batch_info['shape']))} ({batch_info['source']})")
    print(f"{dtype} tolerances: {tolerance_rule(dtype)}")
    print(table(rows))
    with writing(f"--out {out}", "the report was not saved (the table above is its content)", WRITE_FIX):
        written = write_outputs(out, report)
    failed = sum(not r.passed for r in rows)
    if drift:
        where = f"block {drift['layer']}" if drift["layer"] is not None else drift["row"]
        print(f"FAIL: {failed} of {len(rows)} rows past tolerance; first drift: {drift['row']} ({drift['direction']}"
              f"): look at {where} first")
    else:
        print(f"pass: all {len(rows)} rows within tolerance")
    print(f"wrote {', '.join(map(str, written))}" + ("" if len(written) == 2 else
                                                      f" (no {PLOT}: matplotlib is not installed)"))
    return 1 if failed else 0


SUBCOMMAND = (HELP, add_parity_arguments, run_parity)
