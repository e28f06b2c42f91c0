"""The MindSpore path on the CPU: golden vectors through the MindSpore model, torch/MindSpore training
parity, adapters crossing between the frameworks in PEFT format, exact resume, and doctor."""

import json

import numpy as np
import pytest

ms = pytest.importorskip("mindspore", reason="MindSpore is not installed (pip install 'tuneport[mindspore]')")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from tuneport.backends import get_backend  # noqa: E402
from tuneport.core.cli import main  # noqa: E402
from tuneport.core.config import load_recipe  # noqa: E402
from tuneport.core.precision import resolve_precision  # noqa: E402
from tuneport.frameworks.torch.runtime import TorchRuntime  # noqa: E402
from tuneport.models.chatglm3 import load_model as load_torch_model  # noqa: E402
from tuneport.models.chatglm3 import mindspore as msmodel  # noqa: E402

TOL = dict(atol=1e-4, rtol=1e-4)
DEMO = "builtin:demo.yaml"
LAYOUTS = {
    "safetensors": ["model.safetensors.index.json", "model-00001-of-00002.safetensors",
                    "model-00002-of-00002.safetensors"],
    "bin": ["pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"],
}


@pytest.fixture(scope="module", autouse=True)
def cpu_target():
    ms.set_device("CPU")


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def checkpoint(request, golden, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"ms-{request.param}")
    for name in ["config.json", "tokenizer.model", *LAYOUTS[request.param]]:
        (folder / name).symlink_to(golden / "checkpoint" / name)
    return folder


@pytest.fixture(scope="module")
def cases(golden):
    return load_file(str(golden / "cases.safetensors"))


def assert_logits(logits, cases, name):
    logits = logits.asnumpy() if hasattr(logits, "asnumpy") else np.asarray(logits)
    np.testing.assert_allclose(logits[..., :1024], cases[f"{name}_head"], **TOL)
    top = logits.max(-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
    np.testing.assert_allclose(lse, cases[f"{name}_logsumexp"], **TOL)


def test_golden_logits_padding_loss_and_kv_cache(checkpoint, cases):
    model = msmodel.load_model(checkpoint)
    assert_logits(model(cases["input_ids"])[0], cases, "logits")
    assert_logits(model(cases["padded_input_ids"], attention_mask=cases["padded_attention_mask"])[0], cases,
                  "padded_logits")
    np.testing.assert_allclose(model(cases["input_ids"], labels=cases["labels"])[1].asnumpy().reshape(1),
                               cases["loss"], **TOL)
    cache = msmodel.KVCache()
    assert_logits(model(cases["input_ids"][:, :10], cache=cache)[0], cases, "prefill_logits")
    steps = [model(cases["input_ids"][:, i: i + 1], cache=cache)[0].asnumpy() for i in (10, 11)]
    assert_logits(np.concatenate(steps, axis=1), cases, "decode_logits")


def test_golden_lora_logits_loss_and_grads(checkpoint, golden, cases):
    model = msmodel.load_model(checkpoint)
    msmodel.load_lora(model, golden / "lora_adapter", trainable=True)
    logits, loss = model(cases["input_ids"], labels=cases["labels"])
    assert_logits(logits, cases, "lora_logits")
    np.testing.assert_allclose(loss.asnumpy().reshape(1), cases["lora_loss"], **TOL)
    params = model.trainable_parameters()
    grad_fn = ms.value_and_grad(lambda ids, labels: model(ids, labels=labels)[1], None, params)
    _, grads = grad_fn(ms.Tensor(cases["input_ids"], ms.int32), ms.Tensor(cases["labels"], ms.int32))
    expected = load_file(str(golden / "lora_grads.safetensors"))
    assert len(params) == len(expected)
    for param, grad in zip(params, grads):
        np.testing.assert_allclose(grad.asnumpy(), expected["grad." + msmodel.PEFT_PREFIX + param.name], **TOL)


def test_golden_prefix_logits(checkpoint, golden, cases):
    config = json.loads((golden / "prefix_config.json").read_text())
    model = msmodel.load_model(checkpoint, **config)
    msmodel.load_prefix_encoder(model, golden / "prefix_encoder.safetensors")
    assert_logits(model(cases["input_ids"])[0], cases, "prefix_logits")


def initial_adapter(folder):
    """A fresh LoRA adapter for the demo (from the torch runtime), the common start for both frameworks."""
    recipe = load_recipe(DEMO, (f"output_dir={folder}",))
    from tuneport.models.chatglm3.builders import build_model_folder

    build_model_folder("demo", folder / "base")
    backend = get_backend("cpu")
    runtime = TorchRuntime(recipe, backend, resolve_precision("fp32", "cpu", backend.capabilities), folder / "base")
    runtime.save_adapter(folder / "init")
    return folder / "init"


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_torch_and_mindspore_train_the_same(tmp_path, packing):
    """5 optimizer steps of the demo recipe from the same initial adapter: losses and adapters agree, on padded
    rows and on packed ones (MindSpore's masked form against torch's packed kernel)."""
    init = initial_adapter(tmp_path)
    common = ("train.max_steps=5", "save.every=0", f"method.init_from={init}", "train.lr=1e-3",
              f"data.packing={str(packing).lower()}")
    for framework in ("torch", "mindspore"):
        assert main(["train", DEMO, f"output_dir={tmp_path / framework}", f"framework={framework}", *common]) == 0
    losses = {f: [json.loads(line)["loss"] for line in (tmp_path / f / "metrics.jsonl").read_text().splitlines()]
              for f in ("torch", "mindspore")}
    np.testing.assert_allclose(losses["mindspore"], losses["torch"], atol=1e-4, rtol=0)
    a = load_file(str(tmp_path / "torch" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "mindspore" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=1e-4, rtol=1e-4, err_msg=name)


def test_torch_and_mindspore_train_dpo_the_same_and_its_adapter_crosses(tmp_path):
    """3 DPO steps of the preference demo (LoRA) from the same initial adapter: losses, reward margins and
    adapters agree at 1e-4 (at lr 1e-4, as test_distributed's: Adam turns rounding differences of near-zero
    gradients into differences of order lr); the MindSpore run's adapter gives torch (through peft) MindSpore's
    logits."""
    init = initial_adapter(tmp_path)
    common = ("train.max_steps=3", "save.every=0", f"method.init_from={init}", "data.eval=null", "train.lr=1e-4")
    for framework in ("torch", "mindspore"):
        assert main(["train", "builtin:demo_dpo.yaml", f"output_dir={tmp_path / framework}", f"framework={framework}",
                     *common]) == 0
    records = {f: [json.loads(line) for line in (tmp_path / f / "metrics.jsonl").read_text().splitlines()]
               for f in ("torch", "mindspore")}
    for key in ("loss", "margin", "logps_chosen", "logps_rejected"):
        np.testing.assert_allclose([r[key] for r in records["mindspore"]], [r[key] for r in records["torch"]],
                                   atol=1e-4, rtol=1e-5, err_msg=key)
    assert records["torch"][-1]["margin"] > 0  # it learned a preference
    a = load_file(str(tmp_path / "torch" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "mindspore" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=1e-4, rtol=1e-4, err_msg=name)
    ids = np.array([[1000, 1001, 5, 6, 7, 8]], np.int64)
    base = tmp_path / "mindspore" / "base_model"
    with torch.no_grad():
        torch_logits = PeftModel.from_pretrained(load_torch_model(base), str(tmp_path / "mindspore" / "adapter"))(
            torch.from_numpy(ids)).logits.numpy()
    ms_model = msmodel.load_model(base)
    msmodel.load_lora(ms_model, tmp_path / "mindspore" / "adapter")
    np.testing.assert_allclose(ms_model(ids)[0].asnumpy(), torch_logits, **TOL)


def test_adapters_cross_between_frameworks(tmp_path):
    ids = np.array([[1000, 1001, 5, 6, 7, 8]], np.int64)
    assert main(["train", DEMO, f"output_dir={tmp_path / 'ms'}", "framework=mindspore", "train.max_steps=3"]) == 0
    assert main(["train", DEMO, f"output_dir={tmp_path / 'pt'}", "train.max_steps=3"]) == 0
    for trained in ("ms", "pt"):
        base = tmp_path / trained / "base_model"
        torch_model = PeftModel.from_pretrained(load_torch_model(base), str(tmp_path / trained / "adapter"))
        with torch.no_grad():
            torch_logits = torch_model(torch.from_numpy(ids)).logits.numpy()
        ms_model = msmodel.load_model(base)
        msmodel.load_lora(ms_model, tmp_path / trained / "adapter")
        ms_logits = ms_model(ids)[0].asnumpy()
        np.testing.assert_allclose(ms_logits, torch_logits, **TOL)
        assert not np.allclose(ms_logits, msmodel.load_model(base)(ids)[0].asnumpy(), atol=1e-3)  # it changed


def test_mindspore_resume_is_exact(tmp_path):
    common = ("framework=mindspore", "save.every=2", "train.scheduler=constant")
    assert main(["train", DEMO, f"output_dir={tmp_path / 'straight'}", "train.max_steps=4", *common]) == 0
    assert main(["train", DEMO, f"output_dir={tmp_path / 'resumed'}", "train.max_steps=2", *common]) == 0
    assert main(["train", "--resume", str(tmp_path / "resumed"), "train.max_steps=4"]) == 0
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_doctor_reports_mindspore(capsys):
    assert main(["doctor", "--device", "cpu", "--framework", "mindspore"]) == 0
    out = capsys.readouterr().out
    assert f"mindspore {ms.__version__}" in out and "numpy<2" in out and "result: cpu is usable" in out


TORCH_FREE = """
import sys
sys.modules["torch"] = None  # as if torch were not installed: `import torch` fails, find_spec says absent
import numpy as np
from safetensors.numpy import load_file
from tuneport.models.chatglm3 import mindspore as msmodel
import mindspore as ms
ms.set_device("CPU")
golden = sys.argv[1]
cases = load_file(golden + "/cases.safetensors")
model = msmodel.load_model(golden + "/checkpoint")  # the safetensors layout
logits = model(cases["input_ids"])[0].asnumpy()
np.testing.assert_allclose(logits[..., :1024], cases["logits_head"], atol=1e-4, rtol=1e-4)
assert sys.modules["torch"] is None
print("torch-free ok")
"""


def test_the_mindspore_path_runs_without_torch(golden):
    """Import, load and run the MindSpore model in a process whose import of torch fails."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", TORCH_FREE, str(golden)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "torch-free ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("past_len", [0, 3])
def test_one_set_of_mask_rules_for_both_frameworks(past_len):
    """The torch model's masks (model.attention_mask_for) equal the framework-neutral rules MindSpore uses."""
    from tuneport.models.chatglm3.files import attention_allowed
    from tuneport.models.chatglm3.model import attention_mask_for

    padding = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 0]], dtype=bool)
    q_len = padding.shape[1] - past_len
    mask, causal = attention_mask_for(torch.from_numpy(padding), q_len, past_len)
    np.testing.assert_array_equal(mask.numpy(), attention_allowed(padding, q_len, past_len))
    assert not causal
    assert attention_allowed(np.ones_like(padding), q_len, past_len) is None  # no padding: plainly causal
    assert attention_mask_for(torch.ones(3, 8, dtype=torch.bool), q_len, past_len) == (None, True)
