"""ONNX export of a graph module, shared by every family's exporter and the CLIP export: torch's exporter at
:data:`OPSET` with named dynamic axes, then the ONNX checker.

Exporter: the torch.export-based one (``dynamo=True``, torch's default), at opset 18, the opset its operator
library is written for (other opsets go through a version converter). The nn.Transformer trap (the legacy exporter
tracing ``nn.MultiheadAttention`` bakes the sequence length into Reshape nodes) does not apply to our layers
(missrec/nn/layers.py has no shape-dependent Python ints): both exporters give graphs that run and match PyTorch at
every history length 1..50 (both checked in the export tests). The dynamo graph is chosen because it is the
cleaner one (about 160 nodes against about 510 with an ``If`` for the legacy TorchScript exporter, static output
widths, same ONNX Runtime speed), the legacy exporter is deprecated, and torch.export checks the declared dynamic
ranges (hist_len 1..max_len) while tracing, so model code that specialised a length would fail at export time,
not in serving. ``exporter="torchscript"`` stays available for comparison.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch
from torch import nn

from model_export.parity import ExportError

OPSET = 18
EXPORTER = "dynamo"
EXPORTERS = ("dynamo", "torchscript")
# {input name: {axis: (dimension name, min, max or None)}}
DynamicAxes = dict[str, dict[int, tuple[str, int, int | None]]]


@contextmanager
def quiet_exporter_logs() -> Iterator[None]:
    """The exporter's graph passes log every rewrite at INFO; keep them out of an INFO-level CLI run."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_graph(
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    path: Path,
    outputs: list[str],
    dynamic: DynamicAxes,
    exporter: str,
) -> None:
    """Export ``module`` called with keyword ``inputs`` (in signature order; the names become the graph's input
    names) at OPSET, with the named dynamic axes ({input: {axis: (name, min, max)}}), then check the file."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    module.eval()
    names = list(inputs)
    with torch.no_grad():
        if exporter == "dynamo":
            specs = {spec[0]: spec[1:] for axes in dynamic.values() for spec in axes.values()}
            dims = {name: torch.export.Dim(name, min=lo, max=hi) for name, (lo, hi) in specs.items()}
            shapes = {name: {axis: dims[spec[0]] for axis, spec in dynamic[name].items()} for name in names}
            with warnings.catch_warnings(), quiet_exporter_logs():
                # shared axis names (batch) are reported as a rename conflict
                warnings.filterwarnings("ignore", message="# The axis name")
                program = torch.onnx.export(
                    module,
                    (),
                    kwargs=inputs,
                    dynamo=True,
                    input_names=names,
                    output_names=outputs,
                    opset_version=OPSET,
                    dynamic_shapes=shapes,
                    verbose=False,
                )
            program.save(str(path), external_data=False)
        else:
            axes = {name: {axis: spec[0] for axis, spec in dynamic[name].items()} for name in names}
            axes.update({o: {0: "batch"} for o in outputs})
            torch.onnx.export(
                module,
                (),
                str(path),
                kwargs=inputs,
                dynamo=False,
                input_names=names,
                output_names=outputs,
                opset_version=OPSET,
                dynamic_axes=axes,
            )
    proto = onnx.load(str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name} fails the ONNX checker: {exc}") from exc
    opset = {o.domain: o.version for o in proto.opset_import}.get("")
    if opset != OPSET:
        raise ExportError(f"{path.name} was exported at opset {opset}, expected {OPSET}")
