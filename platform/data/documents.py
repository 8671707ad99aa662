"""Reader of the curated dataset artefact: ``iter_artifact_documents(uri)`` -> Documents.

The artefact (written by ``curate.run_curation``) holds ``part-XXXXX.parquet`` files with
columns id, text, source, metadata (JSON), domain, ppl_bucket. Parts are read one at a
time (checksums verified by the store) and in part order, which is the plan order of the
sources, so iteration is deterministic. ``domain`` and ``ppl_bucket`` are also present in
``metadata``; the extra columns exist so that readers can filter without parsing JSON.
"""

from __future__ import annotations

import io
import json
from typing import Iterator

from .schema import Document


def curated_parts(art) -> list[str]:
    return sorted(n for n in art.names() if n.startswith("part-") and n.endswith(".parquet"))


def iter_artifact_documents(uri_or_artifact, settings=None, *, batch_size: int = 1024) -> Iterator[Document]:
    """Documents of a curated artefact, given its URI (file:// or s3://) or an ``Artifact``."""
    import pyarrow.parquet as pq

    if isinstance(uri_or_artifact, str):
        from moeflow.platform.store import read_artifact

        art = read_artifact(uri_or_artifact, settings)
    else:
        art = uri_or_artifact
    for name in curated_parts(art):
        pf = pq.ParquetFile(io.BytesIO(art.get_bytes(name)))
        for batch in pf.iter_batches(batch_size=batch_size, columns=["id", "text", "source", "metadata"]):
            cols = batch.to_pydict()
            for doc_id, text, source, meta in zip(cols["id"], cols["text"], cols["source"], cols["metadata"]):
                yield Document(doc_id, text, source, json.loads(meta) if meta else {})
