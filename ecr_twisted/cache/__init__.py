"""The layer cache: what to answer from disk, and the verified blob store under it."""
