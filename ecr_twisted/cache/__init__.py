"""The layer cache: what to answer from disk, as values the registry handler carries out.

`layer` decides (`plans` are its answers), `store` keeps verified blobs on disk, `tags`
remembers what tags named, `ranges` does the Range arithmetic. Nothing here talks to the
upstream or imports the handler.
"""
