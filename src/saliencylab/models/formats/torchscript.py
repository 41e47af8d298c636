"""TorchScript files (`torch.jit.save`) and `torch.export` programs (`torch.export.save`, `.pt2`).

Neither executes pickled Python code on load: TorchScript reads its own compiled code and tensors, and
`torch.export.load` reads a serialised graph and weights. Gradients flow through both. Their layers run as
one compiled graph, so no layer can be hooked: CAM methods refuse, gradient and perturbation methods work.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from torch import nn

from saliencylab.errors import UserError
from saliencylab.models._classifier import Classifier
from saliencylab.models._preprocess import Preprocessing
from saliencylab.models.formats._assemble import assemble

NO_CAM = ("{fmt} runs its layers as one compiled graph, so no layer can be hooked for CAM methods; use gradient or "
          "perturbation methods, or load the Python model (--model package.module:factory --weights FILE)")


def is_torchscript(path: Path) -> bool:
    """A zip archive with TorchScript's `code/` folder (a torch.save file has only data.pkl and tensors)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n or n.startswith("code/") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_torchscript(path: Path, given: Preprocessing) -> Classifier:
    """A TorchScript classifier: x[B, C, H, W] (normalised as --mean/--std say) -> logits [B, K]."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise UserError(f"'{path}' is not a readable TorchScript file ({type(err).__name__}); save one with "
                        "torch.jit.save(torch.jit.script(model), FILE)") from None
    return assemble(net, source=f"TorchScript '{path}'", name=str(path), fmt="torchscript", declared=Preprocessing(),
                    given=given, weights=f"TorchScript {path}", no_cam=NO_CAM.format(fmt="TorchScript"))


class ExportedNet(nn.Module):
    """A `torch.export` program as a module. Its mode was fixed at export time: train()/eval() do not reach it.

    A program exported with a static batch of one runs image by image.
    """

    def __init__(self, program: nn.Module, static_batch: int | None = None) -> None:
        super().__init__()
        self.program = program
        self.static_batch = static_batch

    def train(self, mode: bool = True) -> ExportedNet:
        self.training = mode  # the exported graph refuses eval(); its BatchNorm/Dropout were fixed at export
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.static_batch == 1 and x.shape[0] != 1:
            return torch.cat([self.program(x[i:i + 1]) for i in range(x.shape[0])])
        if self.static_batch is not None and x.shape[0] != self.static_batch:
            raise UserError(f"this torch.export program was exported for batches of exactly {self.static_batch}; "
                            "re-export it with dynamic_shapes={'x': {0: torch.export.Dim('batch')}}")
        return self.program(x)


def load_export(path: Path, given: Preprocessing) -> Classifier:
    """A `torch.export` program; its example input's static shape gives channels and size."""
    try:
        program = torch.export.load(str(path))
    except Exception as err:
        raise UserError(f"'{path}' is not a readable torch.export program ({type(err).__name__}); save one with "
                        "torch.export.save(torch.export.export(model.eval(), (x,)), FILE)") from None
    declared = Preprocessing()
    specs = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if len(specs) != 1:
        raise UserError(f"'{path}' takes {len(specs)} inputs; a classifier takes one image batch")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == specs[0].arg.name)
    val = node.meta.get("val")
    shape = tuple(val.shape) if val is not None else ()
    if len(shape) != 4:
        raise UserError(f"'{path}' takes an input of shape {shape}, not images [B, C, H, W]")
    static = [s if isinstance(s, int) else None for s in shape]
    if static[1] is not None:
        declared = Preprocessing(input_size=(static[2], static[3]) if None not in static[2:] else None,
                                 channels=static[1])
    net = ExportedNet(program.module(), static[0])
    return assemble(net, source=f"torch.export program '{path}'", name=str(path), fmt="export", declared=declared,
                    given=given, weights=f"torch.export {path}", no_cam=NO_CAM.format(fmt="A torch.export program"))
