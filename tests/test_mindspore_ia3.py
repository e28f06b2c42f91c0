"""IA3 on the MindSpore path: adapters in PEFT's format both ways (peft's own IA3 layers on the torch
model are the reference), torch/MindSpore training parity, and exact resume."""

import json

import numpy as np
import pytest

ms = pytest.importorskip("mindspore", reason="MindSpore is not installed (pip install 'tuneport[mindspore]')")

import torch  # noqa: E402
from peft import IA3Config, PeftModel, get_peft_model  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from tuneport.core.cli import main  # noqa: E402
from tuneport.models.chatglm3 import load_model as load_torch_model  # noqa: E402
from tuneport.models.chatglm3 import mindspore as msmodel  # noqa: E402

TOL = dict(atol=1e-4, rtol=1e-4)
IDS = np.array([[1000, 1001, 5, 6, 7, 8]], np.int64)
# the demo recipe as IA3 on ChatGLM3's default layers; a constant, large rate so 3 steps move the vectors
DEMO_IA3 = ("builtin:demo.yaml", "method.name=ia3", "method.target_modules=null", "train.scheduler=constant",
            "train.warmup_steps=0", "train.lr=0.05")


@pytest.fixture(scope="module", autouse=True)
def cpu_target():
    ms.set_device("CPU")


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(IDS)).logits.numpy()


def test_peft_ia3_adapters_cross_both_ways(golden, tmp_path):
    """An adapter peft writes (vectors far from ones) loads here with the same logits, and the one this
    side writes back has peft's tensor names, shapes and config, and loads in peft with those logits."""
    checkpoint = golden / "checkpoint"
    config = IA3Config(task_type="CAUSAL_LM", target_modules=["query_key_value", "dense_4h_to_h"],
                       feedforward_modules=["dense_4h_to_h"])
    peft_model = get_peft_model(load_torch_model(checkpoint), config)
    generator = torch.Generator().manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "ia3_l" in name:
            param.data = 1 + 0.5 * torch.randn(param.shape, generator=generator)
    peft_model.save_pretrained(tmp_path / "peft")
    expected = torch_logits(peft_model)

    model = msmodel.load_model(checkpoint)
    assert msmodel.load_ia3(model, tmp_path / "peft")["peft_type"] == "IA3"
    logits = model(IDS)[0].asnumpy()
    np.testing.assert_allclose(logits, expected, **TOL)
    assert not np.allclose(logits, msmodel.load_model(checkpoint)(IDS)[0].asnumpy(), atol=1e-2)  # the vectors act

    msmodel.save_ia3(model, tmp_path / "ms", ["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"])
    theirs, ours = (load_file(str(tmp_path / f / "adapter_model.safetensors")) for f in ("peft", "ms"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    theirs, ours = (json.loads((tmp_path / f / "adapter_config.json").read_text()) for f in ("peft", "ms"))
    theirs.pop("peft_version")
    for key in ("target_modules", "feedforward_modules"):  # peft writes a set, in no fixed order
        theirs[key] = sorted(theirs[key])
    assert ours == {**theirs, "base_model_name_or_path": ""}
    np.testing.assert_allclose(torch_logits(PeftModel.from_pretrained(load_torch_model(checkpoint),
                                                                       str(tmp_path / "ms"))), logits, **TOL)


def test_mindspore_ia3_trains_the_same_as_torch_and_loads_in_peft(tmp_path):
    """3 steps of IA3 on each framework from the same start (vectors of ones): the same losses and
    vectors, and the MindSpore adapter loaded by peft on the torch model gives MindSpore's logits."""
    common = (*DEMO_IA3, "train.max_steps=3", "save.every=0")
    for framework in ("torch", "mindspore"):
        assert main(["train", *common, f"output_dir={tmp_path / framework}", f"framework={framework}"]) == 0
    losses = {f: [json.loads(line)["loss"] for line in (tmp_path / f / "metrics.jsonl").read_text().splitlines()]
              for f in ("torch", "mindspore")}
    np.testing.assert_allclose(losses["mindspore"], losses["torch"], atol=1e-4, rtol=0)
    a, b = (load_file(str(tmp_path / f / "adapter" / "adapter_model.safetensors")) for f in ("torch", "mindspore"))
    assert a.keys() == b.keys() and len(a) == 4  # query_key_value and dense_4h_to_h in both layers
    for name in a:
        np.testing.assert_allclose(b[name], a[name], **TOL, err_msg=name)
        assert np.abs(b[name] - 1).max() > 1e-2, name  # trained away from ones
    config = json.loads((tmp_path / "mindspore" / "adapter" / "adapter_config.json").read_text())
    assert (config["target_modules"], config["feedforward_modules"]) == (["dense_4h_to_h", "query_key_value"],
                                                                        ["dense_4h_to_h"])

    base = tmp_path / "mindspore" / "base_model"
    model = msmodel.load_model(base)
    msmodel.load_ia3(model, tmp_path / "mindspore" / "adapter")
    logits = model(IDS)[0].asnumpy()
    np.testing.assert_allclose(torch_logits(PeftModel.from_pretrained(load_torch_model(base),
                                                                       str(tmp_path / "mindspore" / "adapter"))),
                               logits, **TOL)
    assert not np.allclose(logits, msmodel.load_model(base)(IDS)[0].asnumpy(), atol=1e-3)  # it changed


def test_mindspore_ia3_resume_is_exact(tmp_path):
    common = (*DEMO_IA3, "framework=mindspore", "save.every=2")
    assert main(["train", *common, f"output_dir={tmp_path / 'straight'}", "train.max_steps=4"]) == 0
    assert main(["train", *common, f"output_dir={tmp_path / 'resumed'}", "train.max_steps=2"]) == 0
    assert main(["train", "--resume", str(tmp_path / "resumed"), "train.max_steps=4"]) == 0
    a, b = (load_file(str(tmp_path / f / "adapter" / "adapter_model.safetensors")) for f in ("straight", "resumed"))
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
        assert np.abs(a[name] - 1).max() > 1e-2, name
