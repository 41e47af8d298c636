"""ONNX files: converted to PyTorch by onnx2torch where it can (every method works), else run forward-only by
onnxruntime (classify and the perturbation methods work; gradient and CAM methods refuse, naming the operator
the converter lacks and how to re-export). Loading an ONNX file executes no Python code.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from saliencylab.errors import UserError
from saliencylab.models._classifier import Classifier
from saliencylab.models._preprocess import Preprocessing
from saliencylab.models.formats._assemble import assemble

REEXPORT = ("re-export it with torch.onnx.export(model.eval(), x, FILE, dynamo=False, opset_version=17) and "
            "layers the converter knows (see onnx2torch's operator list)")


class PerImage(nn.Module):
    """Runs a network exported for batches of exactly one, image by image."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(x[i:i + 1]) for i in range(x.shape[0])])


class _NoGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out: torch.Tensor, reason: str) -> torch.Tensor:  # noqa: ARG004
        ctx.reason = reason
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None]:  # noqa: ARG004
        raise UserError(ctx.reason)


class OrtNet(nn.Module):
    """An onnxruntime session as a forward-only module: x[B, C, H, W] -> outputs[B, K] (no gradient)."""

    def __init__(self, path: Path, reason: str, batch_of_one: bool) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, torch.get_num_threads())
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.reason = reason
        self.batch_of_one = batch_of_one
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # gives the module a device

    def __deepcopy__(self, memo: dict[int, Any]) -> OrtNet:
        """A copy sharing the (stateless, read-only) session: onnxruntime sessions cannot be copied."""
        new = nn.Module.__new__(OrtNet)
        new.__dict__.update({k: (v if k == "session" else copy.deepcopy(v, memo))
                             for k, v in self.__dict__.items()})
        return new

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().cpu().float().numpy()
        outs = [self._run(arr[i:i + 1]) for i in range(len(arr))] if self.batch_of_one else [self._run(arr)]
        out = torch.from_numpy(np.concatenate(outs)).to(device=x.device, dtype=x.dtype)
        return _NoGradient.apply(x, out, self.reason) if x.requires_grad else out


def _declared(graph: Any) -> tuple[Preprocessing, bool]:
    """Channels and size from the first input's static dims; True when the batch is fixed at one."""
    inp = graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise UserError(f"the ONNX input '{inp.name}' has {len(dims)} dimensions; a classifier takes [B, C, H, W]")
    size = (dims[2], dims[3]) if dims[2] and dims[3] else None
    return Preprocessing(input_size=size, channels=dims[1] or None), dims[0] == 1


def _missing_operator(err: Exception) -> str:
    match = re.search(r"operation_type='([^']+)', version=(\d+)", str(err))
    return f"{match.group(1)} (opset {match.group(2)})" if match else f"{type(err).__name__}: {str(err)[:120]}"


def _takes_batches(net: nn.Module, declared: Preprocessing) -> bool:
    """Whether a converted graph declared for batch one runs on a batch of two anyway (most do)."""
    if declared.channels is None or declared.input_size is None:
        return False
    try:
        with torch.no_grad():
            out = net.eval()(torch.zeros(2, declared.channels, *declared.input_size))
    except Exception:
        return False
    return isinstance(out, torch.Tensor) and out.shape[0] == 2


def load_onnx(path: Path, given: Preprocessing) -> Classifier:
    """An ONNX classifier, converted to torch when onnx2torch can, else run by onnxruntime (forward only)."""
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX models need the onnx extra: pip install 'saliencylab[onnx]'") from None
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as err:
        raise UserError(f"'{path}' is not a valid ONNX model ({type(err).__name__}); export it again with "
                        "torch.onnx.export(model.eval(), x, FILE, dynamo=False, opset_version=17)") from None
    if len(proto.graph.input) - len({i.name for i in proto.graph.initializer}) > 1:
        raise UserError(f"'{path}' takes more than one input; a classifier takes one image batch")
    declared, batch_of_one = _declared(proto.graph)
    source = f"ONNX model '{path}'"
    try:
        from onnx2torch import convert

        net: nn.Module = convert(proto)
        fmt, gradients, no_cam, reason = "onnx", True, None, None
    except Exception as err:
        op = _missing_operator(err)
        reason = (f"'{path}' runs in onnxruntime, forward only, because onnx2torch cannot convert its operator {op}; "
                  f"gradient and CAM methods need a converted model: {REEXPORT} (occlusion and RISE work as it is)")
        net = OrtNet(path, reason, batch_of_one)
        fmt, gradients, no_cam = "onnxruntime", False, reason
        batch_of_one = False  # OrtNet loops itself
    if batch_of_one and not _takes_batches(net, declared):
        net = PerImage(net)
        no_cam = no_cam or (f"'{path}' was exported for batches of exactly one, so CAM layers run once per image; "
                            "re-export with dynamic_axes={'x': {0: 'batch'}} for CAM methods")
    clf = assemble(net, source=source, name=str(path), fmt=fmt, declared=declared, given=given,
                   weights=f"onnx {path}", gradients=gradients, no_cam=no_cam)
    if reason:
        clf.extra["forward_only"] = reason
    return clf
