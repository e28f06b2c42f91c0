"""tuneport: fine-tune large language models with one recipe on any accelerator.

From Python (core/api.py; each loads what it needs when first called, so `import tuneport` is light):

    tuneport.train(recipe, overrides=..., resume=...) -> TrainResult (run_dir, adapter, base_model, metrics)
    tuneport.load(model, adapter=..., device=...)      -> Loaded (model, tokenizer, family; .chat(message))
    tuneport.evaluate(model, data, adapter=..., ...)   -> EvalResult (out, metrics)
    tuneport.export(model, adapter, out, dtype=...)    -> ExportResult (out, record)

Errors are the types of `tuneport.core.errors`. The packages: core (recipes, data, runs, commands),
backends (devices), frameworks (torch, MindSpore: runtimes and methods), models (families).
"""

from importlib import import_module

API = ("train", "load", "evaluate", "export", "TrainResult", "Loaded", "EvalResult", "ExportResult")


def __getattr__(name: str):
    if name in API:  # the API's module imports the run machinery: loaded on first use
        return getattr(import_module(".core.api", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(API)
