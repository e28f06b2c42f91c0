"""AdaLoRA through peft: the rank budget moves after each optimizer step, and its scores are checkpoint state."""

from __future__ import annotations

from ..method import Build, LoraLike

STATE = "adalora.pt"  # in a checkpoint: the step count, importance scores and rank pattern


class AdaLora(LoraLike):
    peft_type = "ADALORA"
    state_file = STATE

    def peft_config(self, method, family, model_config, max_steps):
        import peft

        return peft.AdaLoraConfig(init_r=method.init_r, target_r=method.target_r, tinit=method.tinit,
                                  tfinal=method.tfinal, deltaT=method.delta_t, beta1=method.beta1, beta2=method.beta2,
                                  orth_reg_weight=method.orth_reg_weight,
                                  # without a run (estimate, methods table) any valid schedule gives the same layers
                                  total_step=max_steps or method.tinit + method.tfinal + 1,
                                  **self.common(method, family))

    def attach(self, model, build: Build):
        tuned = super().attach(model, build)
        # peft adds the orthogonality penalty to every micro-batch's loss, of every process: a share of it
        # each keeps the recipe's weight per optimizer step (restored before the adapter is saved)
        tuned.peft_config["default"].orth_reg_weight = build.method.orth_reg_weight / build.shares
        return tuned

    def after_step(self, model, steps_done: int) -> None:
        model.base_model.update_and_allocate(steps_done)  # importance scores from this step; prune on schedule

    def task_model(self, model):
        return model.base_model.model  # without the orthogonality penalty peft adds to the loss

    def state(self, model, steps_done: int) -> dict:
        allocator = model.base_model.rankallocator
        return {"steps_done": steps_done, "rank_pattern": model.peft_config["default"].rank_pattern,
                "ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc}

    def set_state(self, model, state: dict) -> int:
        allocator = model.base_model.rankallocator
        model.peft_config["default"].rank_pattern = state["rank_pattern"]
        allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = \
            state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"]
        return state["steps_done"]

    def save(self, model, build: Build, folder, trained, weights=None) -> None:
        model.peft_config["default"].orth_reg_weight = build.method.orth_reg_weight  # the recipe's, not the share
        super().save(model, build, folder, trained, weights)


METHOD = AdaLora()
