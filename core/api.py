"""tuneport from Python: the commands' steps as functions that return results and raise the errors of
`tuneport.core.errors` (the command line prints each as one line), for notebooks and scripts.

    import tuneport
    run = tuneport.train("recipes/chatglm3_6b_lora.yaml", overrides={"train.max_steps": 100})
    tuned = tuneport.load(run.base_model, adapter=run.adapter)
    print(tuned.chat("你好"))
    scores = tuneport.evaluate(run.base_model, "dev.jsonl", adapter=run.adapter)
    tuneport.export(run.base_model, run.adapter, "merged/")
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from . import evaluate as evaluation
from .errors import RunError
from .export import export as export_folder
from .loading import Loaded, load  # noqa: F401  (tuneport.load, tuneport.Loaded)
from .rundir import read_json_object
from .run import train_run
from .signals import StartupGuard

PathLike = Union[str, Path]
Overrides = Union[Sequence[str], Mapping[str, Any]]


def _override_list(overrides: Overrides) -> list[str]:
    """`key=value` strings; a mapping's values are written as YAML (JSON is YAML) the recipe parser reads."""
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in overrides.items()]
    return [str(item) for item in overrides]


@dataclass(frozen=True)
class TrainResult:
    """A finished run: its folder, the tuned result (`adapter`), the base model it was tuned from, and each
    optimizer step's record (loss, lr, grad_norm, tokens, ...) as metrics.jsonl has it."""

    run_dir: Path
    adapter: Path
    base_model: Path
    metrics: list[dict] = field(repr=False)

    @property
    def final_loss(self) -> float:
        return self.metrics[-1]["loss"]


def train(recipe: Optional[PathLike] = None, overrides: Overrides = (), resume: Optional[PathLike] = None, *,
          device: Optional[str] = None, framework_name: Optional[str] = None) -> TrainResult:
    """Run `tuneport train`: `recipe` (a YAML file or `builtin:NAME.yaml`; None: the built-in demo) with
    `overrides` (["train.lr=1e-4", ...] or {"train.lr": 1e-4}); `resume`: continue that run folder from its
    newest checkpoint (the recipe is its own; overrides may change only its length and saving).

    Raises:
        RecipeError, DataError, CheckpointError, FolderError, MethodUnavailable, BackendUnavailable, RunError:
            a problem with the inputs, found before anything is written (the message names the fix).
        Diverged: the loss stopped being finite.
        Stopped: SIGINT or SIGTERM arrived; a checkpoint was saved first.
    """
    args = argparse.Namespace(recipe=str(recipe) if recipe is not None else None, overrides=_override_list(overrides),
                              resume=str(resume) if resume is not None else None, device=device,
                              framework=framework_name, guard=StartupGuard())
    trained = train_run(args)
    return TrainResult(trained.output_dir, trained.output_dir / "adapter", Path(trained.model_dir), trained.records)


@dataclass(frozen=True)
class EvalResult:
    """`tuneport eval`'s scores (ROUGE-1/2/L, BLEU-4, as the official ChatGLM3 demo) and the folder with
    eval.json and predictions.jsonl."""

    out: Path
    metrics: dict


def evaluate(model: PathLike, data: PathLike, adapter: Optional[PathLike] = None, out: Optional[PathLike] = None,
             **options) -> EvalResult:
    """Run `tuneport eval` on the dev file `data`; `options` are its other flags by their Python names
    (device="cpu", dtype="bf16", batch_size=8, max_new_tokens=..., max_input_length=..., limit=..., format=...).

    Raises:
        the errors of `load`, DataError (the dev file), FolderError (`out`), MissingDependency (the eval extra).
    """
    parser = argparse.ArgumentParser(prog="tuneport.evaluate")
    evaluation.add_eval_arguments(parser)
    known = set(vars(parser.parse_args(["--model", str(model), "--data", str(data)]))) - {"model", "data"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise RunError(f"tuneport.evaluate: unknown options {unknown}; the options are {sorted(known - {'adapter', 'out'})}")
    argv = ["--model", str(model), "--data", str(data)]
    for key, value in dict(options, adapter=adapter, out=out).items():
        argv += [f"--{key.replace('_', '-')}", str(value)] if value is not None else []
    args = parser.parse_args(argv)
    evaluation.run_eval(args)
    folder = Path(args.out) if args.out else evaluation.default_out(Path(adapter) if adapter is not None else None)
    return EvalResult(folder, read_json_object(folder / evaluation.EVAL_RECORD)["metrics"])


@dataclass(frozen=True)
class ExportResult:
    """`tuneport export`'s folder and its record (export.json: each file's sha256, the code files' fate, ...)."""

    out: Path
    record: dict


def export(model: PathLike, adapter: Optional[PathLike], out: PathLike, dtype: str = "fp32", *,
           overwrite: bool = False, fmt: str = "safetensors", copy_code: bool = False) -> ExportResult:
    """Run `tuneport export`: `adapter` merged into `model`, written in the family's official layout to `out`
    (fmt "onnx": one ONNX generation step with its KV cache).

    Raises:
        CheckpointError: a bad model or adapter, an unknown dtype, or an `out` that may not be replaced.
    """
    record = export_folder(Path(model), Path(adapter) if adapter is not None else None, Path(out), dtype, overwrite,
                           fmt, copy_code)
    return ExportResult(Path(out), record)
