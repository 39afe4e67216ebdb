"""HTTP/1.1 on both legs of the proxy, independent of what the requests mean.

`http11` parses and frames messages, `policy` decides connection behaviour, `exchange` is
the per-request interface handlers use, `server` and `upstream` move the bytes of the two
legs, `files` sends cached files, `sockets` does fast socket I/O, `origin` names upstreams,
`tls` sets up TLS. Nothing here imports the registry, cache or access packages.
"""

__all__: list[str] = []
