"""`tuneport export`: a tuned result merged into its base and written in the official ChatGLM3 layout,
checked against the golden vectors of the official implementation."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuneport.frameworks.torch.build import load_tuned_model
from tuneport.core.cli import main
from tuneport.core.data import file_sha256
from tuneport.core.export import COPIED, RELEASE, SKIPPED, release_code
from tuneport.models.chatglm3 import load_model
from tuneport.models.chatglm3.builders import build_model_folder
from tuneport.models.chatglm3.files import RELEASE_CODE

TOL = dict(atol=1e-4, rtol=1e-4)
DEMO = "builtin:demo.yaml"


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def no_leftovers(folder) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@torch.no_grad()
def test_golden_lora_export_reproduces_the_official_lora_logits(golden, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", "--model", str(golden / "checkpoint"), "--adapter", str(golden / "lora_adapter"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    cases = load_file(golden / "cases.safetensors")
    logits = load_model(out)(cases["input_ids"]).logits
    torch.testing.assert_close(logits[..., :1024], cases["lora_logits_head"], **TOL)
    torch.testing.assert_close(torch.logsumexp(logits, dim=-1), cases["lora_logits_logsumexp"], **TOL)
    official = golden / "checkpoint"
    assert json.loads((out / "config.json").read_text()).keys() == json.loads((official / "config.json").read_text()).keys()
    weights = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert weights.keys() == json.loads((official / "model.safetensors.index.json").read_text())["weight_map"].keys()
    record = json.loads((out / "export.json").read_text())
    for name, digest in record["sha256"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest and f"{digest}  {out / name}" in printed
    assert set(record["sha256"]) == {p.name for p in out.iterdir()} - {"export.json"}
    assert no_leftovers(tmp_path)


def test_ptuning_export_reproduces_the_runs_logits(golden, tmp_path):
    run = tmp_path / "run"
    assert main(["train", DEMO, f"model={golden / 'checkpoint'}", "tokenizer=null", "method.name=ptuning_v2",
                 "method.num_virtual_tokens=4", "train.max_steps=2", "train.micro_batch_size=2",
                 f"output_dir={run}"]) == 0
    out = tmp_path / "merged"
    assert main(["export", "--model", str(golden / "checkpoint"), "--adapter", str(run / "adapter"),
                 "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["pre_seq_len"] == 4
    ids = torch.tensor([[64790, 64792, 36474, 54591, 30910, 13]])
    with torch.no_grad():
        tuned = load_tuned_model(golden / "checkpoint", run / "adapter")(ids).logits
        torch.testing.assert_close(load_model(out)(ids).logits, tuned, atol=1e-5, rtol=1e-5)


def test_bf16_export(golden, tmp_path):
    out = tmp_path / "bf16"
    assert main(["export", "--model", str(golden / "checkpoint"), "--out", str(out), "--dtype", "bf16"]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model-00001-of-00001.safetensors").values()
               if t.is_floating_point())


def test_bad_exports_are_one_line_and_leave_nothing(golden, tmp_path, capsys):
    out = tmp_path / "merged"
    args = ["export", "--model", str(golden / "checkpoint"), "--out", str(out)]
    assert main([*args, "--adapter", str(tmp_path / "missing")]) == 2
    assert "no such folder" in one_error_line(capsys.readouterr().err)
    build_model_folder("demo", tmp_path / "demo_base")  # another base: the golden adapter does not fit it
    assert main(["export", "--model", str(tmp_path / "demo_base"), "--adapter", str(golden / "lora_adapter"),
                 "--out", str(out)]) == 2
    assert "does not fit the base model" in one_error_line(capsys.readouterr().err)
    assert not out.exists() and no_leftovers(tmp_path)

    assert main(args) == 0
    first = (out / "export.json").read_bytes()
    assert main(args) == 2
    assert "already exists" in one_error_line(capsys.readouterr().err)
    assert (out / "export.json").read_bytes() == first
    assert main([*args, "--overwrite"]) == 0  # an earlier export may be replaced

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep\n")
    assert main(["export", "--model", str(golden / "checkpoint"), "--out", str(mine), "--overwrite"]) == 2
    assert "replaces only what it wrote" in one_error_line(capsys.readouterr().err)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and no_leftovers(tmp_path)
    assert main([*args, "--overwrite", "--dtype", "fp8"]) == 2
    assert "--dtype fp8" in one_error_line(capsys.readouterr().err)
    shutil.rmtree(out)


def test_qlora_export_matches_the_qlora_model(golden, datasets, tmp_path):
    """The export merges the adapter into the dequantized 4-bit base the adapter was trained on.

    Measured here (bitsandbytes 0.50 on the CPU): the export's logits are within 5.8e-3 of the QLoRA
    model's (its 4-bit matmul does not compute exactly in fp32), while a merge into the original fp32 base
    is off by the quantization error itself, 0.89. The stated tolerance is 1e-2, and the dequantized base
    must be at least 10 times closer than the plain merge."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (tuneport[qlora])")
    from peft import PeftModel

    from tuneport.frameworks.torch.methods.qlora import quantize_linear_4bit

    run = tmp_path / "run"
    assert main(["train", str(Path(__file__).resolve().parents[1] / "recipes/chatglm3_6b_qlora.yaml"), f"model={golden / 'checkpoint'}", "train.max_steps=2",
                 "device=cpu", "precision=fp32", f"data.train={datasets / 'advertisegen/train.json'}",
                 "data.eval=null", "train.micro_batch_size=2", f"output_dir={run}"]) == 0
    out = tmp_path / "merged"
    assert main(["export", "--model", str(golden / "checkpoint"), "--adapter", str(run / "adapter"),
                 "--out", str(out)]) == 0
    ids = torch.tensor([[64790, 64792, 36474, 54591, 30910, 13, 30954, 31123]])
    with torch.no_grad():
        base = load_model(golden / "checkpoint")
        quantize_linear_4bit(base, "nf4", True, torch.float32, torch.device("cpu"))
        qlora = PeftModel.from_pretrained(base, str(run / "adapter")).eval()(ids).logits
        exported = load_model(out)(ids).logits
        naive = PeftModel.from_pretrained(load_model(golden / "checkpoint"), str(run / "adapter")).merge_and_unload()(ids).logits
    print(f"export vs QLoRA model: {(exported - qlora).abs().max():.2e}; fp32-base merge: {(naive - qlora).abs().max():.2e}")
    assert (exported - qlora).abs().max() < 1e-2
    assert (naive - qlora).abs().max() > 10 * (exported - qlora).abs().max()  # the dequantized base matters


def test_only_a_published_releases_code_travels_with_the_export(golden, tmp_path, capsys):
    """Engines that load an export with --trust-remote-code run its `*_chatglm.py`: a base folder's copy that is
    no published release's (here, planted and modified) is skipped with one line each, unless --copy-code;
    another .py file of the folder is never copied."""
    base = tmp_path / "release"
    shutil.copytree(golden / "checkpoint", base)
    (base / "modeling_chatglm.py").write_text("import os\nos.system('echo planted')\n")
    (base / "tokenization_chatglm.py").write_text("# a modified tokenizer\n")
    (base / "helper.py").write_text("# not the release's\n")
    out = tmp_path / "merged"
    assert main(["export", "--model", str(base), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("modeling_chatglm.py", "tokenization_chatglm.py"):
        assert not (out / name).exists()
        assert f"skipped {base / name}: its sha256 " in printed and "export again with --copy-code" in printed
    record = json.loads((out / "export.json").read_text())
    assert {n: c["action"] for n, c in record["code"].items()} == {"modeling_chatglm.py": SKIPPED,
                                                                   "tokenization_chatglm.py": SKIPPED}
    assert not (out / "helper.py").exists()

    assert main(["export", "--model", str(base), "--out", str(out), "--overwrite", "--copy-code"]) == 0
    printed = capsys.readouterr().out
    assert (out / "modeling_chatglm.py").read_text() == (base / "modeling_chatglm.py").read_text()
    assert f"copied {base / 'modeling_chatglm.py'} (--copy-code)" in printed and "will run it" in printed
    assert "modeling_chatglm.py" in json.loads((out / "export.json").read_text())["sha256"]
    assert not (out / "helper.py").exists()


def test_release_code_is_copied_by_its_published_sha256(tmp_path):
    """The rule on a table of published versions: equal sha256, copied; any other, skipped (copied with
    copy_code). The real table (models/chatglm3/files.py) holds sha256 digests of the release's three files."""
    (tmp_path / "tokenization_chatglm.py").write_text("# published\n")
    (tmp_path / "modeling_chatglm.py").write_text("# changed\n")
    published = {"tokenization_chatglm.py": frozenset({file_sha256(tmp_path / "tokenization_chatglm.py")}),
                 "modeling_chatglm.py": frozenset({"0" * 64}), "configuration_chatglm.py": frozenset({"1" * 64})}
    actions = {name: action for name, (_, action) in release_code(tmp_path, published, False).items()}
    assert actions == {"tokenization_chatglm.py": RELEASE, "modeling_chatglm.py": SKIPPED}
    assert release_code(tmp_path, published, True)["modeling_chatglm.py"][1] == COPIED
    assert set(RELEASE_CODE) == {"configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py"}
    assert all(re.fullmatch("[0-9a-f]{64}", h) for hashes in RELEASE_CODE.values() for h in hashes)