"""P-tuning v2: the family's own prefix encoder trains, saved under the official names."""

import json

from safetensors.numpy import save_file

from ....core.errors import MethodUnavailable
from ....core.methods import PREFIX_CONFIG, PREFIX_WEIGHTS
from ..method import MindSporeMethod


class PtuningV2(MindSporeMethod):
    def attach(self, model, build) -> None:
        prefix = build.family.prefix_module
        if not prefix:
            raise MethodUnavailable(f"method ptuning_v2 is ChatGLM's own prefix encoder; {build.family.model_type} "
                                    "has none: use method prefix_tuning")
        for name, param in model.parameters_and_names():
            param.requires_grad = name.startswith(f"{prefix}.")

    def save(self, model, build, folder, trained) -> None:
        (folder / PREFIX_CONFIG).write_text(json.dumps(build.method.model_overrides(build.family)))
        save_file({n: p.asnumpy() for n, p in trained.items()}, str(folder / PREFIX_WEIGHTS))


METHOD = PtuningV2()
