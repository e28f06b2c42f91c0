#!/bin/bash
# Entrypoint of the Ascend image: source CANN's environment, then run tuneport (or the given command).
#
# CANN's set_env.sh exports the library and operator paths (LD_LIBRARY_PATH, ASCEND_OPP_PATH, ...)
# that torch_npu and MindSpore need. It has to run in the process that starts tuneport: sourcing it in
# a Dockerfile RUN line sets the variables for that one RUN's shell, and no later layer or container
# sees them.
#
#   tuneport-entrypoint train RECIPE ... --device npu    ->  tuneport train RECIPE ... --device npu
#   tuneport-entrypoint torchrun --nproc_per_node 8 ...   ->  torchrun ... (a program on PATH runs as is)
#
# CANN_SET_ENV names another set_env.sh (tests point it at a stand-in, as they have no CANN).

cann_set_env="${CANN_SET_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}"
if [ ! -f "$cann_set_env" ]; then
    echo "error: CANN environment script $cann_set_env not found: this image expects the CANN toolkit" \
         "at /usr/local/Ascend/ascend-toolkit (set CANN_SET_ENV if it lives elsewhere)" >&2
    exit 1
fi
# Sourced from a function called without arguments, so set_env.sh never sees tuneport's arguments as
# its own. No `set -eu` around it: set_env.sh reads variables that may be unset, and its last test may
# return non-zero without anything being wrong.
load_cann_env() {
    # shellcheck source=/dev/null
    . "$cann_set_env"
}
load_cann_env

if [ $# -gt 0 ] && type -P -- "$1" >/dev/null; then
    exec "$@"
fi
exec tuneport "$@"
