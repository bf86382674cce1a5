"""`pipeline.search.appearance` past `ANN_MIN_ROWS`: the IVF_PQ candidates re-ranked on their exact
vectors give the exact top objects on a small dataset (every list probed). The synced, exact path
against DuckDB is tests/jobs/test_query_similar.py."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.search import index as search_index
from pipeline.search.appearance import SCALAR, AppearanceIndex


def test_the_vector_index_path_gives_the_exact_top_objects(tmp_path, monkeypatch):
    monkeypatch.setattr(search_index, "ANN_MIN_ROWS", 600)
    monkeypatch.setattr(search_index, "ROWS_PER_PARTITION", 100)
    rng = np.random.default_rng(11)
    n, dim = 800, 16
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    ids = np.arange(n)
    table = pa.table({
        "video_id": pa.array([f"v{i // 8:03d}" for i in ids]), "run_id": pa.array(["r"] * n),
        "commit": pa.array(["r/0"] * n), "object_id": pa.array((ids // 2 % 4).astype(np.int32)),
        "clip_index": pa.array((ids % 2).astype(np.int32)), "track_id": pa.array((ids // 2 % 4).astype(np.int32)),
        "model": pa.array(["m"] * n), "dim": pa.array(np.full(n, dim, np.int32)),
        "label": pa.array(["person" if i % 3 else "dog" for i in ids]),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)})
    dataset = search_index._lance().write_dataset(table, str(tmp_path / "appearance.lance"))
    assert search_index._maintain(dataset, n, dim, None, None, scalar=SCALAR, text=False) == n
    assert "vector" in {i.field_names[0] for i in dataset.describe_indices()}
    looks = AppearanceIndex(dataset, {"dim": dim})
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    query = vectors[5] + 0.1 * rng.normal(size=dim).astype(np.float32)
    cosine = unit @ (query / np.linalg.norm(query))
    best: dict[tuple[str, int], float] = {}
    for i in ids:
        key = (f"v{i // 8:03d}", int(i // 2 % 4))
        if key != ("v000", 2):  # the excluded object (holds row 5)
            best[key] = max(best.get(key, -2.0), float(cosine[i]))
    want = sorted(best, key=lambda k: (-best[k], k))[:6]
    found = looks.nearest_objects(query, "m", 6, exclude=("v000", 2))
    got = list(zip(found.column("video_id").to_pylist(), found.column("object_id").to_pylist()))
    assert got == want
    assert np.allclose(found.column("similarity").to_numpy(), [best[k] for k in want], atol=1e-4)
    assert found.column("tracklets").to_pylist() == [2] * 6
    assert looks.nearest_objects(query, "other", 6).num_rows == 0
