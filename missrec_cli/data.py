"""The data commands of ``missrec``: synth (a SYNTHETIC dataset) and prepare (a raw catalogue and interaction
log to the atomic format, with CLIP features from :mod:`clip_features`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from missrec_cli.common import Seed, console, fail


def synth(
    out: Annotated[Path, typer.Option("--out", help="Directory for the SYNTHETIC dataset.")],
    users: Annotated[int, typer.Option(help="Number of users.")] = 2000,
    items: Annotated[int, typer.Option(help="Number of items.")] = 1000,
    topics: Annotated[int, typer.Option(help="Latent topics.")] = 24,
    seed: Seed = 0,
) -> None:
    """Write a deterministic SYNTHETIC multi-modal dataset (latent topics drive features and behaviour)."""
    from missrec.data.synthetic import generate_synthetic

    path = generate_synthetic(out, num_users=users, num_items=items, num_topics=topics, seed=seed)
    console.print(f"wrote synthetic dataset to {path}")


def prepare(
    items: Annotated[Path, typer.Option("--items", help="Catalog: JSON lines {item_id, text, image}.")],
    interactions: Annotated[Path, typer.Option("--interactions", help="CSV with user_id,item_id,timestamp.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the atomic dataset.")],
    name: Annotated[str | None, typer.Option(help="Dataset name (default: the folder name).")] = None,
    min_core: Annotated[int, typer.Option(help="k-core filtering threshold.")] = 5,
    clip_model: Annotated[str | None, typer.Option(help="open_clip architecture [default: ViT-B-32].")] = None,
    clip_pretrained: Annotated[
        str | None, typer.Option(help="open_clip tag or local checkpoint path [default: openai].")
    ] = None,
    clip_onnx: Annotated[
        Path | None,
        typer.Option(help="CLIP ONNX directory (missrec export-clip): the graphs the service ingests with."),
    ] = None,
    allow_bad_images: Annotated[bool, typer.Option(help="Zero image row instead of failing.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset in --out.")] = False,
) -> None:
    """Turn a raw catalog + interaction log into the atomic format (k-core, leave-one-out, CLIP features)."""
    from clip_features.onnx_encoder import ClipOnnxError
    from clip_features.preprocess import ImageDecodeError, ItemEncoder
    from missrec.data.prepare import PrepareError, prepare_dataset

    if clip_onnx is not None and (clip_model or clip_pretrained):
        raise fail("--clip-onnx names the model and weights: leave out --clip-model and --clip-pretrained")
    try:
        encoder: ItemEncoder
        if clip_onnx is not None:
            from clip_features.onnx_encoder import OnnxClipEncoder

            encoder = OnnxClipEncoder(clip_onnx, threads=0)
        else:
            from clip_features.torch_encoder import ClipEncoder

            encoder = ClipEncoder(clip_model or "ViT-B-32", clip_pretrained or "openai")
        summary = prepare_dataset(
            items,
            interactions,
            out,
            encoder,
            name=name,
            min_core=min_core,
            allow_bad_images=allow_bad_images,
            overwrite=overwrite,
        )
    except (PrepareError, ImageDecodeError, ClipOnnxError, FileNotFoundError, ValueError, RuntimeError) as exc:
        raise fail(str(exc)) from None
    console.print_json(data=summary.to_dict())


def register(app: typer.Typer) -> None:
    app.command()(synth)
    app.command()(prepare)
