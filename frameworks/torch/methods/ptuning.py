"""P-tuning through peft (its prompt encoder)."""

from ..method import VirtualTokens


class Ptuning(VirtualTokens):
    peft_type = "P_TUNING"
    def peft_config(self, method, family, model_config, max_steps):
        import peft

        return peft.PromptEncoderConfig(num_virtual_tokens=method.num_virtual_tokens, task_type="CAUSAL_LM",
                                        encoder_hidden_size=method.encoder_hidden_size,
                                        encoder_reparameterization_type=method.encoder_type)


METHOD = Ptuning()
