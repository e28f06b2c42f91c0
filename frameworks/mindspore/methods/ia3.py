"""(IA)^3, saved as a PEFT adapter; its vectors train in float32, as every trainable parameter here."""

from ....core.errors import MethodUnavailable
from ..method import PeftAdapter


class Ia3(PeftAdapter):
    peft_type = "IA3"

    def attach(self, model, build) -> None:
        try:
            targets, feedforward = build.method.modules(build.family)
        except ValueError as e:
            raise MethodUnavailable(str(e)) from None
        build.msmodel.add_ia3(model, targets, feedforward)
        build.kept.update(target_modules=targets, feedforward_modules=feedforward)

    def load(self, model, adapter, msmodel) -> None:
        msmodel.load_ia3(model, adapter, trainable=True)

    def save(self, model, build, folder, trained) -> None:
        build.msmodel.save_ia3(model, folder, base_model=str(build.model_dir.resolve()), **build.kept)


METHOD = Ia3()
