"""open_clip's image and text encoders as ONNX graphs, run with ONNX Runtime: ingestion and ``missrec prepare``
without torch or open_clip.

A CLIP directory (written by ``missrec export-clip``, :mod:`model_export.clip`)::

    image_encoder.onnx   pixels (1, 3, S, S) f32 -> features (1, D) f32   (open_clip encode_image, not normalised)
    text_encoder.onnx    tokens (1, L) i64       -> features (1, D) f32   (open_clip encode_text, not normalised)
    bpe_simple_vocab_16e6.txt.gz                 open_clip's BPE vocabulary (copied: the tokenizer needs no open_clip)
    clip.json            the manifest: model, checkpoint sha256, D, S, mean/std, tokenizer, C, opset, parity, sha256s

The text graph takes the ids up to and including ``<end_of_text>`` (L = 2..C, :func:`trim_tokens`): the text
transformer is causal and pools that position, so the zero padding after it changes nothing and is not computed.
Preprocessing and tokenizing are the explicit, torch-free ones of :mod:`clip_features.preprocess`; images go
through the same gate (:func:`~clip_features.preprocess.decode_image`) as with the torch encoder. One item per
call, batch 1, as :class:`clip_features.torch_encoder.ClipEncoder` (the offline and online paths stay identical).
This module imports neither torch nor open_clip.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from clip_features.preprocess import (
    MAX_IMAGE_PIXELS,
    MAX_UNCROPPED_ASPECT,
    ClipTokenizer,
    ImageInput,
    ImageTransform,
    ItemEncoder,
    decode_image,
    file_sha256,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "clip.json"
IMAGE_GRAPH = "image_encoder.onnx"
TEXT_GRAPH = "text_encoder.onnx"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
IMAGE_INPUT, TEXT_INPUT, OUTPUT = "pixels", "tokens", "features"


def trim_tokens(ids: np.ndarray) -> np.ndarray:
    """``(C,)`` token ids -> ``(1, L)``: up to the end-of-text id (the largest id, where open_clip pools)."""
    return ids[None, : int(ids.argmax()) + 1]


class ClipOnnxError(ValueError):
    """A CLIP directory that is missing, damaged or inconsistent (one line saying what and how to fix it)."""


@dataclass(frozen=True)
class ClipManifest:
    """``clip.json``: what the graphs compute and how their inputs are made."""

    model_name: str
    pretrained: str  # the open_clip tag or the checkpoint's file name
    checkpoint_sha256: str | None  # of a local checkpoint (None for a tag)
    dim: int  # feature width D of both encoders
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    context_length: int
    opset: int
    resize: str = "shortest side to image_size, bicubic (Pillow), then centre crop"
    tokenizer: str = "CLIP byte-level BPE (open_clip SimpleTokenizer, clean='lower'), vocabulary " + VOCAB_FILE
    parity: dict[str, Any] = field(default_factory=dict)  # max |ORT - open_clip| at export, counts, inputs
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    versions: dict[str, str] = field(default_factory=dict)  # open_clip, torch, onnx at export
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @property
    def transform(self) -> ImageTransform:
        return ImageTransform(self.image_size, tuple(self.mean), tuple(self.std))

    def made_from(self, weights: str) -> bool:
        """True when these graphs were exported from ``weights``: a local checkpoint file with the recorded sha256,
        or the open_clip tag recorded (when no checkpoint was)."""
        path = Path(weights).expanduser()
        if path.is_file():
            return file_sha256(path) == self.checkpoint_sha256
        return self.checkpoint_sha256 is None and weights == self.pretrained


def read_manifest(directory: str | Path, *, verify: bool = True) -> ClipManifest:
    """Read and check ``clip.json`` (format version, required files, their sha256 when ``verify``)."""
    root = Path(directory)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ClipOnnxError(f"{root} is not a CLIP ONNX directory (no {MANIFEST_FILE}); write one: missrec export-clip")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format_version") != FORMAT_VERSION:
            raise ClipOnnxError(
                f"{path}: format version {raw.get('format_version')!r}, this code reads {FORMAT_VERSION}; "
                "export it again with missrec export-clip"
            )
        manifest = ClipManifest(**{**raw, "mean": tuple(raw["mean"]), "std": tuple(raw["std"])})
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
        raise ClipOnnxError(f"{path} is not a valid CLIP manifest: {exc}") from None
    for name in (IMAGE_GRAPH, TEXT_GRAPH, VOCAB_FILE):
        if name not in manifest.files:
            raise ClipOnnxError(f"{path} lists no checksum for {name}")
        if not (root / name).is_file():
            raise ClipOnnxError(f"{root / name} is missing")
        if verify and file_sha256(root / name) != manifest.files[name]:
            raise ClipOnnxError(f"{root / name} does not match its sha256 in {MANIFEST_FILE} (damaged or replaced)")
    return manifest


def session_options(threads: int) -> ort.SessionOptions:
    """All graph optimisations, ``threads`` intra-op threads (0 = ONNX Runtime's default), sequential execution."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


class OnnxClipEncoder(ItemEncoder):
    """The exported open_clip encoders on ONNX Runtime (CPU); same interface as ``ClipEncoder``.

    ``threads``: intra-op threads of each encode (1 leaves the other cores to recommendations).
    """

    def __init__(
        self, directory: str | Path, *, threads: int = 1, max_image_pixels: int = MAX_IMAGE_PIXELS, verify: bool = True
    ) -> None:
        self.directory = Path(directory).resolve()
        self.manifest = read_manifest(self.directory, verify=verify)
        m = self.manifest
        self.model_name = m.model_name
        self.dim: int = m.dim
        self.max_image_pixels = max_image_pixels
        self.transform = m.transform
        self.tokenizer = ClipTokenizer(self.directory / VOCAB_FILE, m.context_length)
        providers = ["CPUExecutionProvider"]
        try:
            self._image = ort.InferenceSession(
                str(self.directory / IMAGE_GRAPH), session_options(threads), providers=providers
            )
            self._text = ort.InferenceSession(
                str(self.directory / TEXT_GRAPH), session_options(threads), providers=providers
            )
        except Exception as exc:  # ONNX Runtime's own errors: a damaged or foreign graph
            raise ClipOnnxError(f"{self.directory}: ONNX Runtime cannot load the CLIP graphs: {exc}") from None
        self._check_graph(self._image, IMAGE_INPUT, [1, 3, m.image_size, m.image_size], "tensor(float)")
        self._check_graph(self._text, TEXT_INPUT, [1, "text_length"], "tensor(int64)")
        log.info("CLIP ONNX encoder: %s from %s, dim %d, threads %d", m.model_name, self.directory, m.dim, threads)

    def _check_graph(self, session: ort.InferenceSession, name: str, shape: list[int | str], dtype: str) -> None:
        inputs, outputs = session.get_inputs(), session.get_outputs()
        got = [(i.name, list(i.shape), i.type) for i in inputs]
        if got != [(name, shape, dtype)] or [o.name for o in outputs] != [OUTPUT] or outputs[0].shape != [1, self.dim]:
            raise ClipOnnxError(
                f"{self.directory}: graph inputs {got} / outputs {[(o.name, o.shape) for o in outputs]} do not match "
                f"the manifest ({name} {shape} {dtype} -> {OUTPUT} [1, {self.dim}])"
            )

    def __repr__(self) -> str:
        return f"OnnxClipEncoder({str(self.directory)!r}, model_name={self.model_name!r}, dim={self.dim})"

    def pixels(self, image: ImageInput) -> np.ndarray:
        """Untrusted image bytes (or a PIL image) -> the ``(3, S, S)`` float32 input of the image graph."""
        decoded = decode_image(image, max_pixels=self.max_image_pixels, max_aspect=MAX_UNCROPPED_ASPECT)
        return self.transform(decoded)

    def encode_image(self, image: ImageInput) -> np.ndarray:
        (features,) = self._image.run([OUTPUT], {IMAGE_INPUT: self.pixels(image)[None]})
        return np.array(features[0], dtype=np.float32)

    def encode_text(self, text: str) -> np.ndarray:
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        (features,) = self._text.run([OUTPUT], {TEXT_INPUT: trim_tokens(self.tokenizer(text))})
        return np.array(features[0], dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        """What produced the features (for manifests): the exported model's identity and the graphs' checksums."""
        m = self.manifest
        return {
            "model_name": m.model_name,
            "pretrained": m.pretrained,
            "dim": m.dim,
            "normalized": False,
            "runtime": f"onnxruntime {ort.__version__}",
            "clip_onnx": str(self.directory),
            "graphs_sha256": {name: m.files[name] for name in (IMAGE_GRAPH, TEXT_GRAPH)},
            **({"checkpoint_sha256": m.checkpoint_sha256} if m.checkpoint_sha256 else {}),
        }
