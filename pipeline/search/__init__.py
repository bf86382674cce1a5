"""Search by meaning: caption and answer vectors (`embeddings`), the Lance search index beside the
tables (`index`: the sync; `reader`: what `--like` queries), kept up to date off the hot path
(`sync`)."""
