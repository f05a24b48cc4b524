"""A non-MISSRec tower served without service changes: an ``inner_product`` bundle (user tower = mean of the history
tokens, item vector = concatenated per-modality projections, as MSM4SR's) built from a small torch model exported
to ONNX, served end to end: recommend equals brute force, exclusions give exactly k, explanations come from the
blocks, a real ABO photo ingested through the bundle's own item tower is recommended, then deleted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from torch import nn

from index_builder.build import build_index
from serving_core.bundle import (
    FORMAT,
    FORMAT_VERSION,
    INNER_PRODUCT,
    Block,
    BundleWriter,
    Dims,
    ItemTable,
    Manifest,
    Scorer,
    creation_info,
)
from serving_core.towers import tower_graphs
from tests.service_helpers import make_app

# the legacy exporter is enough for these two small graphs (no attention: nothing length-specific to bake in; the
# test serves histories of other lengths than the export example)
pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
N, F_DIM, T, D = 300, 512, 16, 8  # items, raw feature width (the tiny CLIP's), token width, vector width per block


class ItemTower(nn.Module):
    """Raw features -> the token the user tower gathers, and the unit item vector [text part | image part]."""

    def __init__(self) -> None:
        super().__init__()
        self.text, self.image = nn.Linear(F_DIM, D), nn.Linear(F_DIM, D)
        self.token = nn.Linear(2 * F_DIM, T)

    def forward(self, text_features: torch.Tensor, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [F.normalize(self.text(text_features), dim=-1), F.normalize(self.image(image_features), dim=-1)]
        return self.token(torch.cat([text_features, image_features], -1)), torch.cat(parts, -1) / np.sqrt(2)


class UserTower(nn.Module):
    """History tokens (B, L, T) + lengths (B,) -> (B, 2D): the mean valid token, projected."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(T, 2 * D)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        valid = (torch.arange(tokens.shape[1])[None, :] < lengths[:, None]).to(tokens.dtype)  # (B, L)
        mean = (tokens * valid[..., None]).sum(1) / lengths[:, None].to(tokens.dtype)
        return self.proj(mean)


def _export(module: nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str], path, dynamic) -> None:
    torch.onnx.export(
        module.eval(), (), str(path), kwargs=inputs, dynamo=False, input_names=list(inputs), output_names=outputs,
        opset_version=18, dynamic_axes=dynamic,
    )  # fmt: skip


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """SYNTHETIC items (random features), real ONNX graphs, an exact Flat index."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ip-bundle")
    item, user = ItemTower(), UserTower()
    writer = BundleWriter(root)
    feats = torch.randn(N, F_DIM), torch.randn(N, F_DIM)
    with torch.no_grad():
        tokens, vectors = item(*feats)
    tokens[0], vectors[0] = 0.0, 0.0
    item_io = ("text_features", "image_features", "tokens", "item")
    item_inputs = {"text_features": feats[0][:3], "image_features": feats[1][:3]}
    _export(item, item_inputs, ["tokens", "item"], writer.path("item_tower.onnx"), {n: {0: "batch"} for n in item_io})
    user_inputs = {"tokens": torch.randn(3, 5, T), "lengths": torch.tensor([5, 2, 1])}
    user_axes = {"tokens": {0: "batch", 1: "len"}, "lengths": {0: "batch"}, "user": {0: "batch"}}
    _export(user, user_inputs, ["user"], writer.path("user_tower.onnx"), user_axes)
    table = ItemTable(
        ids=["", *(f"ip{r}" for r in range(1, N))],
        tokens=tokens.numpy().astype(np.float32),
        vectors={"item": vectors.numpy().astype(np.float32)},
        clusters={},
        popularity=np.arange(N, dtype=np.float32)[::-1].copy(),
        texts=["", *(f"synthetic item {r}" for r in range(1, N))],
    )
    writer.write_item_table(table)
    writer.finalize(
        Manifest(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            model_kind="mean-pool-test",
            model={"token": T, "hidden": 2 * D},
            dims=Dims(hidden=2 * D, token=T, features={"text": F_DIM, "image": F_DIM}),
            scorer=Scorer(INNER_PRODUCT, ("text", "image"), blocks=(Block("text", 0, D), Block("image", D, 2 * D))),
            graphs=tower_graphs(("text", "image"), inner_product=True),
            num_items=N,
            num_interests=0,
            max_len=20,
            created=creation_info("tests", SYNTHETIC="random features"),
        )
    )
    build_index(root, "Flat", "cpu", progress=False)
    return root, user, table


def test_an_inner_product_bundle_is_served_end_to_end(
    bundle, redis_url, key_prefix, tiny_clip, abo_dir, tmp_path, abo_products
):
    root, user, table = bundle
    history = ["ip5", "ip17", "ip42"]
    with TestClient(make_app(root, redis_url, key_prefix, tiny_clip, tmp_path)) as client:
        ready = client.get("/readyz").json()
        assert "mean-pool-test" in ready["checks"]["bundle"] and "inner_product" in ready["checks"]["bundle"]
        body = client.post("/v1/recommend", json={"history": history, "k": 10, "explain": True}).json()
        assert body["model_version"].startswith("mean-pool-test-") and body["exact"] is True
        with torch.no_grad():
            u = user(torch.from_numpy(table.tokens[[5, 17, 42]])[None], torch.tensor([3])).numpy()[0]
        scores = table.vectors["item"] @ u
        scores[[0, 5, 17, 42]] = -np.inf  # padding and the history (exclude_seen)
        want = np.lexsort((np.arange(N), -scores))[:10]
        assert [i["item_id"] for i in body["items"]] == [f"ip{r}" for r in want]
        np.testing.assert_allclose([i["score"] for i in body["items"]], scores[want], atol=1e-4)
        for item in body["items"]:
            e = item["explanation"]
            assert e["interest"] is None and e["text_weight"] + e["image_weight"] == pytest.approx(1.0, abs=1e-4)
        exclude = [f"ip{r}" for r in want[:6]]
        again = client.post("/v1/recommend", json={"history": history, "k": 10, "exclude": exclude}).json()
        assert len(again["items"]) == 10 and not {i["item_id"] for i in again["items"]} & set(exclude)

        product = abo_products[0]
        image = product["images"][0].read_bytes()
        r = client.post("/v1/items", data={"item_id": "abo-ip", "text": product["text"]}, files={"image": image})
        assert r.status_code == 201, r.text
        assert r.json()["text_cluster"] is None  # no interest clusters in this model
        own = client.post("/v1/recommend", json={"history": ["abo-ip"], "k": 300, "exclude_seen": False}).json()
        assert "abo-ip" in [i["item_id"] for i in own["items"]]
        assert client.get("/v1/items/abo-ip").json()["source"] == "ingested"
        assert client.delete("/v1/items/abo-ip").status_code == 204
        gone = client.post("/v1/recommend", json={"history": history, "k": 300}).json()
        assert "abo-ip" not in [i["item_id"] for i in gone["items"]]
