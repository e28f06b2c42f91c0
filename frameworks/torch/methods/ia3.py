"""(IA)^3 through peft."""

from ....core.errors import MethodUnavailable
from ..method import PeftMethod


class Ia3(PeftMethod):
    peft_type = "IA3"
    def peft_config(self, method, family, model_config, max_steps):
        import peft

        try:
            targets, feedforward = method.modules(family)
        except ValueError as e:
            raise MethodUnavailable(str(e)) from None
        return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM")


METHOD = Ia3()
