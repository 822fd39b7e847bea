"""embed_captions: the frozen text encoder over every caption, cached in HDF5.

Layout: /embeddings float32 [n_captions, dim] in caption_id order; root attrs: provenance
with the encoder spec and `captions_sha256`, the hash of the captions file it was computed
from. Readers check that hash, so a changed caption file is never served a stale cache.
"""
from __future__ import annotations

import logging

import numpy as np

from .. import config
from ..config import text_spec
from ..encoders import build_text_encoder, embed_texts
from ..errors import VlddError
from ..io import config_hash, h5_dataset, h5_writer, open_h5, provenance, sha256_file
from ..model import resolve_device
from ..progress import Progress, quiet_library_bars

log = logging.getLogger(__name__)


def embed_captions(data_dir, text_encoder, out_path, device="auto", batch_size=256):
    """Embed every caption of the prepared store with the frozen text encoder
    (model.text_encoder, a vldd.config typed section) into out_path."""
    from pathlib import Path

    import pandas as pd

    if isinstance(text_encoder, dict):
        text_encoder = config.typed("model.text_encoder", text_encoder)
    text_cfg = text_encoder.as_dict()
    captions_path = Path(data_dir) / "captions.parquet"
    if not captions_path.exists():
        raise VlddError(f"{captions_path}: not found. Run prepare_dataset first.")
    try:
        captions = pd.read_parquet(captions_path, columns=["caption"])
    except Exception as exc:  # noqa: BLE001  (pyarrow raises several types)
        raise VlddError(f"{captions_path}: not a readable captions table ({exc}). Delete the "
                        "data folder and rerun prepare_dataset.") from exc
    quiet_library_bars()
    tower = build_text_encoder(text_cfg)
    dev = resolve_device(device)
    n_unique = captions["caption"].nunique()
    bar = Progress(n_unique, f"embed_captions {text_encoder.name}", unit="caption", log=log)
    emb = embed_texts(tower, captions["caption"].tolist(), batch_size, dev, bar.update)
    attrs = provenance("embeddings", text_spec(text_cfg), captions_sha256=sha256_file(captions_path),
                       n_captions=len(captions), dim=int(emb.shape[1]))
    with h5_writer(out_path, attrs) as f:
        h5_dataset(f, "embeddings", emb)
    log.info("embedded %d captions (%d distinct) into %s (dim %d)", len(captions), n_unique,
             out_path, emb.shape[1])


