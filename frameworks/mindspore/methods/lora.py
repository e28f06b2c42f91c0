"""LoRA, saved as a PEFT adapter (the family's MindSpore module adds and writes it)."""

from ..method import PeftAdapter


class Lora(PeftAdapter):
    peft_type = "LORA"
    switchable = True  # its branches turn off for DPO's reference

    def attach(self, model, build) -> None:
        method, mm = build.method, build.msmodel
        r, alpha, dropout = method.r, method.alpha, method.dropout
        targets = list(method.target_modules or build.family.lora_targets)
        if method.init_from:
            config = mm.load_lora(model, method.init_from, trainable=True)
            r, alpha, dropout = config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0)
            targets = config["target_modules"]
            targets = [targets] if isinstance(targets, str) else list(targets)
        else:
            mm.add_lora(model, r, alpha, dropout, targets, seed=build.seed)
        build.kept.update(r=r, alpha=alpha, dropout=dropout, target_modules=targets)

    def load(self, model, adapter, msmodel) -> None:
        msmodel.load_lora(model, adapter, trainable=True)

    def save(self, model, build, folder, trained) -> None:
        build.msmodel.save_lora(model, folder, base_model=str(build.model_dir.resolve()), **build.kept)


METHOD = Lora()
