"""Opening a model for generation, the same way for `tuneport chat`, `eval`, `serve` and `tuneport.load`: the
device set up first, the tokenizer checked against the checkpoint's config before any weight loads, then the
base with its tuned result (torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..backends import open_backend
from ..frameworks import framework
from ..models import TEMPLATE_FILE, ModelFamily, family_for
from .errors import RunError


@dataclass
class Opened:
    """A checked model folder on a set-up device, before its weights load."""

    folder: Path
    family: ModelFamily
    tokenizer: Any
    config: Any  # the checkpoint's config, as its family's check read it
    device: str
    backend: Any
    index: int


def open_model(model: Path, device: str, adapter: Optional[Path] = None) -> Opened:
    """Set up `device` (auto, cpu, cuda:1, ...), then check the checkpoint folder `model` and its tokenizer
    (with the chat template a run trained `adapter` with, when its recipe named one: data.template).

    Raises:
        RunError: an unknown device.
        BackendUnavailable: the device is not usable here.
        CheckpointError: a bad folder, or a tokenizer that does not fit the model.
    """
    try:
        device_name, backend, index = open_backend(device)
    except ValueError as e:
        raise RunError(f"--device: {e}") from None
    model = Path(model)
    family = family_for(model)
    template = Path(adapter) / TEMPLATE_FILE if adapter is not None else None
    if template is not None and template.is_file() and family.templated:
        tokenizer = family.load_tokenizer(model, template=template)
    else:
        tokenizer = family.load_tokenizer(model)
    config = family.check_checkpoint(model)[0]
    family.check_vocabulary(tokenizer, config, model, model)
    return Opened(model, family, tokenizer, config, device_name, backend, index)


def tuned_model(opened: Opened, adapter: Optional[Path], dtype: Optional[str] = None, merge: bool = False):
    """The base of `opened` with the tuned result `adapter` applied, in `dtype` (fp32, bf16, fp16; None: float32),
    in eval mode; `merge`: folded into the weights where its method allows (LoRA: the same answers, faster).

    Raises:
        CheckpointError: an adapter that is missing, damaged, or tuned from another base.
    """
    torch_framework = framework("torch")
    loaded = torch_framework.build_tuned_model(opened.folder, None, opened.backend, "load",
                                               torch_framework.DTYPES[dtype] if dtype else None,
                                               device_index=opened.index, adapter=adapter)
    merged = loaded.method.merged(loaded.model) if merge and loaded.method else None
    return (loaded.model if merged is None else merged).eval()


@dataclass
class Loaded:
    """A model ready to generate: the torch model (a tuned result applied, in eval mode), its tokenizer
    (chat template, stop tokens) and family, on `device`."""

    model: Any
    tokenizer: Any
    family: ModelFamily
    device: str

    def chat(self, message: str, history: Optional[list[dict]] = None, max_new_tokens: int = 512,
             stream: bool = False) -> str:
        """The greedy reply to `message` after `history` ([{"role", "content"}, ...], extended in place);
        `stream`: print it to stdout as it is generated."""
        import torch
        from transformers import TextStreamer

        history = [] if history is None else history
        inputs = self.tokenizer.build_chat_input(message, history=history).to(self.model.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=self.tokenizer.stop_token_ids,
                                      pad_token_id=self.tokenizer.pad_token_id,
                                      streamer=TextStreamer(self.tokenizer, skip_prompt=True,
                                                            skip_special_tokens=True) if stream else None)
        text = self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        history.extend([{"role": "user", "content": message}, {"role": "assistant", "content": text}])
        return text


def load(model, adapter=None, device: str = "auto", dtype: Optional[str] = None) -> Loaded:
    """`tuneport.load`: the base checkpoint `model` with the tuned result `adapter` (a PEFT adapter, a P-tuning
    v2 folder or a complete checkpoint) applied, on `device`, in `dtype`; the errors of `open_model` and
    `tuned_model`."""
    adapter = Path(adapter) if adapter is not None else None
    opened = open_model(Path(model), device, adapter)
    return Loaded(tuned_model(opened, adapter, dtype), opened.tokenizer,
                  opened.family, opened.device)
