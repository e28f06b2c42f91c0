"""`tuneport export --format onnx`: the ONNX graph of one generation step with its KV cache, checked
against the golden vectors of the official implementation and against the torch model, and decoded by
`onnx_generate` in a process without torch."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tuneport.core.cli import main
from tuneport.models.chatglm3 import load_model
from tuneport.models.chatglm3.onnx import export_onnx

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[mindspore,onnx]'")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed: pip install -e '.[mindspore,onnx]'")

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def exported(golden, tmp_path_factory):
    """The golden checkpoint exported with the command users run."""
    out = tmp_path_factory.mktemp("onnx") / "golden"
    assert main(["export", "--model", str(golden / "checkpoint"), "--out", str(out), "--format", "onnx"]) == 0
    return out


@pytest.fixture(scope="module")
def cases(golden):
    return load_file(golden / "cases.safetensors")


class Graph:
    """The exported graph driven as a caller without torch would: plain arrays in, logits and cache out."""

    def __init__(self, path):
        self.session = ort.InferenceSession(str(path / "model.onnx"))
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past_specs = self.session.get_inputs()[3:]

    def empty(self, batch):
        return {s.name: np.zeros((batch, s.shape[1], 0, s.shape[3]), np.float32) for s in self.past_specs}

    def run(self, ids, mask, past):
        ids, mask = np.asarray(ids, np.int64), np.asarray(mask, np.int64)
        cached = mask.shape[1] - ids.shape[1]
        positions = np.broadcast_to(np.arange(cached, mask.shape[1]), ids.shape).astype(np.int64)
        out = self.session.run(self.outputs, {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                                              **past})
        return out[0], {n.replace("present", "past_key_values"): v for n, v in zip(self.outputs[1:], out[1:])}


def assert_golden(logits, cases, name):
    logits = torch.from_numpy(logits)
    torch.testing.assert_close(logits[..., :1024], cases[f"{name}_head"], **TOL)
    torch.testing.assert_close(torch.logsumexp(logits, dim=-1), cases[f"{name}_logsumexp"], **TOL)


def test_export_passes_the_checker_and_reproduces_the_golden_logits(exported, cases):
    import onnx

    onnx.checker.check_model(str(exported / "model.onnx"), full_check=True)
    record = json.loads((exported / "export.json").read_text())
    assert record["format"] == "onnx" and record["onnx_max_abs_diff"] < 1e-4
    assert {"model.onnx", "model.onnx.data", "config.json", "tokenizer.model"} <= set(record["sha256"])
    graph = Graph(exported)
    ids = cases["input_ids"].numpy()
    assert_golden(graph.run(ids, np.ones_like(ids), graph.empty(2))[0], cases, "logits")
    padded = cases["padded_input_ids"].numpy()
    mask = cases["padded_attention_mask"].numpy()
    real_rows = mask.astype(bool)  # the golden logits at padded positions are not defined by any caller
    logits = graph.run(padded, mask, graph.empty(2))[0]
    head = torch.from_numpy(logits[..., :1024])[torch.from_numpy(real_rows)]
    torch.testing.assert_close(head, cases["padded_logits_head"][torch.from_numpy(real_rows)], **TOL)
    # The cache: ten tokens at once, then two fed one at a time.
    prefill, past = graph.run(ids[:, :10], np.ones((2, 10)), graph.empty(2))
    assert_golden(prefill, cases, "prefill_logits")
    steps = []
    for t in (10, 11):
        logits, past = graph.run(ids[:, t:t + 1], np.ones((2, t + 1)), past)
        steps.append(logits)
    assert_golden(np.concatenate(steps, axis=1), cases, "decode_logits")


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seq", [1, 7, 64])
@torch.no_grad()
def test_onnxruntime_matches_torch_with_left_padding_and_the_cache(exported, golden, batch, seq):
    model = load_model(golden / "checkpoint").eval()
    generator = torch.Generator().manual_seed(seq * 10 + batch)
    ids = torch.randint(0, model.config.padded_vocab_size, (batch, seq), generator=generator)
    mask = torch.ones_like(ids)
    if seq > 1:
        mask[0, :seq // 2] = 0  # left padding, as the tokenizer pads a batch
    nxt = torch.randint(0, model.config.padded_vocab_size, (batch, 1), generator=generator)
    step_mask = torch.cat((mask, mask.new_ones(batch, 1)), dim=1)
    prompt = model(input_ids=ids, attention_mask=mask, use_cache=True)
    step = model(input_ids=nxt, attention_mask=step_mask, past_key_values=prompt.cache, use_cache=True)
    graph = Graph(exported)
    logits, past = graph.run(ids.numpy(), mask.numpy(), graph.empty(batch))
    torch.testing.assert_close(torch.from_numpy(logits), prompt.logits, **TOL)
    logits, _ = graph.run(nxt.numpy(), step_mask.numpy(), past)
    torch.testing.assert_close(torch.from_numpy(logits), step.logits, **TOL)


def test_ptuning_prefix_is_part_of_the_graph(golden, cases, tmp_path):
    """The official prefix encoder's golden logits, from a graph whose cache holds real tokens only."""
    model = load_model(golden / "checkpoint", **json.loads((golden / "prefix_config.json").read_text()))
    model.load_state_dict(load_file(golden / "prefix_encoder.safetensors"), strict=False)
    export_onnx(model.eval(), tmp_path / "model.onnx")
    graph = Graph(tmp_path)
    ids = cases["input_ids"].numpy()
    assert_golden(graph.run(ids, np.ones_like(ids), graph.empty(2))[0], cases, "prefix_logits")
    first, past = graph.run(ids[:, :10], np.ones((2, 10)), graph.empty(2))
    assert past["past_key_values.0.key"].shape[2] == 10
    second, _ = graph.run(ids[:, 10:], np.ones((2, 12)), past)
    assert_golden(np.concatenate((first, second), axis=1), cases, "prefix_logits")


DECODE = """
import json, sys
from tuneport.core.export import onnx_generate
ids = onnx_generate(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]))
assert "torch" not in sys.modules, "onnx_generate imported torch"
print(json.dumps(ids.tolist()))
"""


def test_onnx_generate_reproduces_the_golden_greedy_ids_without_torch(exported, cases):
    prompt = cases["greedy_prompt"]
    new = cases["greedy_ids"].shape[1]
    done = subprocess.run([sys.executable, "-c", DECODE, str(exported), json.dumps(prompt.tolist()), str(new)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = json.loads(done.stdout)
    assert ids[0][:prompt.shape[1]] == prompt[0].tolist()
    assert ids[0][prompt.shape[1]:] == cases["greedy_ids"][0].tolist()


def test_a_corrupt_onnx_file_is_one_line_and_exit_2(exported, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes((exported / "model.onnx").read_bytes()[:5000])
    for folder, what in ((broken, "model.onnx: not a loadable ONNX model"), (tmp_path / "missing", "file not found")):
        done = subprocess.run([sys.executable, "-m", "tuneport.core.onnx_generate", str(folder), "--ids", "1", "2"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {folder}") and what in lines[0], done.stderr
    done = subprocess.run([sys.executable, "-m", "tuneport.core.onnx_generate", str(exported), "--ids", "1", "65024"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == ("error: input_ids: ids must be from 0 to 65023 (the "
                                                            "model's vocabulary); got 1 to 65024"), done.stderr


def test_bad_onnx_exports_are_one_line_and_leave_nothing(golden, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(golden / "checkpoint"), "--out", str(out), "--format", "onnx",
                 "--dtype", "bf16"]) == 2
    assert main(["export", "--model", str(golden / "checkpoint"), "--out", str(out), "--format", "tflite"]) == 2
    err = capsys.readouterr().err
    assert "--format onnx writes fp32 only" in err and "--format tflite: not one of safetensors, onnx" in err
    assert list(tmp_path.iterdir()) == []
