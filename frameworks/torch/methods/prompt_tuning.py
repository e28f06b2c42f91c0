"""Prompt tuning through peft."""

from ..method import VirtualTokens


class PromptTuning(VirtualTokens):
    peft_type = "PROMPT_TUNING"
    def peft_config(self, method, family, model_config, max_steps):
        import peft

        return peft.PromptTuningConfig(num_virtual_tokens=method.num_virtual_tokens, task_type="CAUSAL_LM")


METHOD = PromptTuning()
