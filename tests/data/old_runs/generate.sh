#!/usr/bin/env bash
# Regenerates tests/data/old_runs/ (read README.md first) with the code of commit a2dfb1a, the last commit
# before the frameworks/ refactor. Run from anywhere, with the project's venv active:
#   bash tests/data/old_runs/generate.sh
# It checks the old commit out in a separate worktree (/tmp/oldcode), makes Python import that code through
# PYTHONPATH (/tmp/oldpkg/tuneport/{core,backends,models,recipes} -> the worktree) and runs from the
# worktree's root, so the recipes record the repository-relative paths tests/golden/... and tests/data/....
set -euo pipefail
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
COMMIT=a2dfb1a
OLD=/tmp/oldcode PKG=/tmp/oldpkg WORK=/tmp/old_runs_gen
DEST="$REPO/tests/data/old_runs"

[ -d "$OLD" ] || git -C "$REPO" worktree add "$OLD" "$COMMIT"
[ "$(git -C "$OLD" rev-parse --short=7 HEAD)" = "$COMMIT" ]
mkdir -p "$PKG/tuneport"
for d in core backends models recipes; do ln -sfn "$OLD/$d" "$PKG/tuneport/$d"; done
export PYTHONPATH="$PKG"
cd "$OLD"
# The old code, not the editable install, must be what runs.
python - <<'PY'
import sys
import tuneport.core.cli, tuneport.core.trainer, tuneport.backends.torch_runtime, tuneport.backends.mindspore
import tuneport.models.chatglm3, tuneport.recipes
files = {n: getattr(m, "__file__", None) or str(list(m.__path__)) for n, m in sys.modules.items()
         if n.startswith("tuneport")}
wrong = {n: f for n, f in files.items() if "/tmp/oldpkg/" not in f}
assert not wrong, wrong
print("old code:", files["tuneport.core.trainer"])
PY

COMMON=(model=tests/golden/chatglm3/checkpoint data.train=tests/data/advertisegen/train.json
        data.eval=tests/data/advertisegen/dev.json data.max_input_length=64 data.max_output_length=64
        train.micro_batch_size=2 train.max_steps=4 save.every=2 eval.every=2 eval.max_batches=1
        device=cpu precision=fp32)
declare -A RECIPE=([lora_torch]=recipes/chatglm3_6b_lora.yaml [ptuning_v2_torch]=recipes/chatglm3_6b_ptuning_v2.yaml
                   [lora_mindspore]=recipes/chatglm3_6b_lora.yaml)
declare -A EXTRA=([lora_torch]="method.dropout=0.1" [ptuning_v2_torch]="framework=torch"
                  [lora_mindspore]="framework=mindspore method.dropout=0")
declare -A WEIGHTS=([lora_torch]="adapter_model.safetensors adapter_config.json"
                    [ptuning_v2_torch]="prefix_encoder.safetensors prefix_config.json"
                    [lora_mindspore]="adapter_model.safetensors adapter_config.json")

rm -rf "$WORK"
for case in lora_torch ptuning_v2_torch lora_mindspore; do
    args=(train "${RECIPE[$case]}" "${COMMON[@]}" ${EXTRA[$case]})
    # 1. the reference: 4 steps without a stop
    python -m tuneport.core.entry "${args[@]}" output_dir="$WORK/$case/straight"
    # 2. the interrupted run: SIGKILLed right after optimizer step 3, as tests/test_train.py's resume test does;
    #    its newest checkpoint is checkpoints/step-2 (metrics.jsonl still holds step 3, no adapter/)
    rc=0; python tests/killer.py step 3 "${args[@]}" output_dir="$WORK/$case/interrupted" || rc=$?
    [ "$rc" = 137 ] || { echo "expected SIGKILL (137), got $rc" >&2; exit 1; }
    [ -d "$WORK/$case/interrupted/checkpoints/step-2" ] && [ ! -e "$WORK/$case/interrupted/checkpoints/step-4" ] \
        && [ ! -e "$WORK/$case/interrupted/adapter" ]
    # 3. the old code resumes its own folder bit-exactly (else the data would prove nothing)
    cp -a "$WORK/$case/interrupted" "$WORK/$case/resumed"
    python -m tuneport.core.entry train --resume "$WORK/$case/resumed"
    python - "$WORK/$case" ${WEIGHTS[$case]%% *} <<'PY'
import sys
from safetensors.numpy import load_file
root, name = sys.argv[1], sys.argv[2]
a, b = load_file(f"{root}/straight/adapter/{name}"), load_file(f"{root}/resumed/adapter/{name}")
assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
print(root, "old code resumes bit-exactly:", len(a), "tensors")
PY
    # 4. store the interrupted folder and what the test compares
    rm -rf "${DEST:?}/$case"
    mkdir -p "$DEST/$case/reference"
    cp -a "$WORK/$case/interrupted" "$DEST/$case/run"
    for f in ${WEIGHTS[$case]}; do cp "$WORK/$case/straight/adapter/$f" "$DEST/$case/reference/"; done
    cp "$WORK/$case/straight/metrics.jsonl" "$DEST/$case/reference/"
done
du -sh "$DEST"
echo "done; remove the worktree with: git -C $REPO worktree remove --force $OLD"
