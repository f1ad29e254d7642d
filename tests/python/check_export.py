"""Reads a fresco export with the Python tools dataset builders use (pyarrow, webdataset).

Usage: check_export.py MANIFEST.parquet WDS_DIR N_SAMPLES
Exits non-zero with a message on the first mismatch.
"""
import glob
import hashlib
import json
import os
import sys

import pyarrow.parquet as pq
import webdataset as wds

manifest, wds_dir, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

table = pq.read_table(manifest)
assert table.num_rows == n, f"manifest has {table.num_rows} rows, expected {n}"
for col in ["key", "prompt", "negative_prompt", "seed", "parameters", "sha256", "width", "height", "url"]:
    assert col in table.column_names, f"manifest lacks column {col}: {table.column_names}"
rows = table.to_pylist()
assert all(r["width"] > 0 and r["height"] > 0 for r in rows)
for r in rows:
    json.loads(r["parameters"])

shards = sorted(glob.glob(os.path.join(wds_dir, "*.tar")))
assert shards, "no shards"
seen = 0
for shard in shards:
    side = pq.read_table(shard[:-4] + ".parquet")
    count = 0
    for sample in wds.WebDataset(shard, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        assert sample["txt"].decode() == meta["caption"], "caption mismatch"
        assert hashlib.sha256(sample["png"]).hexdigest() == meta["sha256"], "image bytes differ from their sha256"
        assert sample["__key__"] == meta["key"]
        count += 1
    assert side.num_rows == count, f"{shard}: {count} samples but {side.num_rows} parquet rows"
    seen += count
assert seen == n, f"{seen} samples in shards, expected {n}"
print(f"ok: {n} rows, {len(shards)} shards")
