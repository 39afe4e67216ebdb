"""Build small (or huge, streamed) OCI image layouts for integration tests, and push them.

Tests need images whose every digest they know in advance, without a container
engine or network: :func:`make_oci_layout` writes an OCI image layout directory
(``oci-layout``, ``index.json``, ``blobs/sha256/...``) that ``skopeo copy
oci:DIR:TAG docker://HOST/REPO:TAG`` pushes as is, so the manifest digest in the
registry equals :attr:`ImageInfo.manifest_digest`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import pathlib
import random
import subprocess
import tarfile
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "ImageInfo",
    "OCI_MANIFEST",
    "OCI_CONFIG",
    "OCI_LAYER",
    "OCI_LAYER_GZIP",
    "make_tar_layer",
    "make_oci_layout",
    "make_big_oci_layout",
    "write_big_tar_layer",
    "skopeo_copy",
    "sha256_digest",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
_CHUNK = 1 << 20


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """Everything a test may want to compare against what a registry/proxy serves."""

    tag: str
    manifest_digest: str
    layer_digests: list[str]
    config_digest: str
    manifest: bytes
    config: bytes
    layer_sizes: list[int]
    layout_dir: pathlib.Path
    media_type: str = OCI_MANIFEST

    @property
    def blob_digests(self) -> list[str]:
        """Config then layers: every blob a push uploads."""
        return [self.config_digest, *self.layer_digests]

    def blob_path(self, digest: str) -> pathlib.Path:
        """Where the layout stores a blob (to compare bytes without loading a huge one)."""
        algo, hexd = digest.split(":", 1)
        return self.layout_dir / "blobs" / algo / hexd


def make_tar_layer(files: Mapping[str, bytes]) -> bytes:
    """A deterministic uncompressed tar (fixed mtime/owner), i.e. a real, unpackable layer."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            data = files[name]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _blob_dir(layout: pathlib.Path) -> pathlib.Path:
    d = layout / "blobs" / "sha256"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _write_blob(layout: pathlib.Path, data: bytes) -> str:
    digest = sha256_digest(data)
    path = _blob_dir(layout) / digest.split(":", 1)[1]
    if not path.exists():
        path.write_bytes(data)
    return digest


def _config_bytes(diff_ids: Sequence[str], labels: Mapping[str, str] | None) -> bytes:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Labels": dict(labels)} if labels else {},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "ecr_twisted.testing.images"}]
        * len(diff_ids),
    }
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _finish_layout(
    layout: pathlib.Path,
    tag: str,
    layers: Sequence[tuple[str, int, str]],  # (digest, size, media type)
    diff_ids: Sequence[str],
    labels: Mapping[str, str] | None,
) -> ImageInfo:
    config = _config_bytes(diff_ids, labels)
    config_digest = _write_blob(layout, config)
    manifest_obj = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": mt, "digest": d, "size": s} for d, s, mt in layers],
    }
    manifest = json.dumps(manifest_obj, sort_keys=True, separators=(",", ":")).encode("utf-8")
    manifest_digest = _write_blob(layout, manifest)

    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}', encoding="utf-8")
    index_path = layout / "index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text(encoding="utf-8"))
    else:
        index = {"schemaVersion": 2, "manifests": []}
    ref_key = "org.opencontainers.image.ref.name"
    index["manifests"] = [
        m for m in index["manifests"] if m.get("annotations", {}).get(ref_key) != tag
    ] + [
        {
            "mediaType": OCI_MANIFEST,
            "digest": manifest_digest,
            "size": len(manifest),
            "annotations": {ref_key: tag},
        }
    ]
    index_path.write_text(json.dumps(index, indent=1), encoding="utf-8")
    return ImageInfo(
        tag=tag,
        manifest_digest=manifest_digest,
        layer_digests=[d for d, _, _ in layers],
        config_digest=config_digest,
        manifest=manifest,
        config=config,
        layer_sizes=[s for _, s, _ in layers],
        layout_dir=layout,
    )


def make_oci_layout(
    layout_dir: os.PathLike[str] | str,
    layers: Iterable[bytes],
    tag: str = "latest",
    *,
    gzip_layers: bool = False,
    labels: Mapping[str, str] | None = None,
) -> ImageInfo:
    """Write (or add ``tag`` to) an OCI layout whose layers are exactly ``layers``.

    Each item of ``layers`` is the layer's uncompressed content; registries never
    look inside, but use :func:`make_tar_layer` if a client must unpack it.  With
    ``gzip_layers`` the blobs are gzip-compressed deterministically and the
    digests returned are those of the compressed blobs.  Identical layers across
    calls/tags share one blob, as in a real registry.
    """
    layout = pathlib.Path(layout_dir)
    layout.mkdir(parents=True, exist_ok=True)
    entries: list[tuple[str, int, str]] = []
    diff_ids: list[str] = []
    for raw in layers:
        diff_ids.append(sha256_digest(raw))
        blob = gzip.compress(raw, mtime=0) if gzip_layers else raw
        entries.append((_write_blob(layout, blob), len(blob), OCI_LAYER_GZIP if gzip_layers else OCI_LAYER))
    return _finish_layout(layout, tag, entries, diff_ids, labels)


def write_big_tar_layer(path: os.PathLike[str] | str, size: int, *, seed: int = 0, name: str = "big.bin") -> str:
    """Stream an uncompressed tar holding one ``size``-byte file of pseudo-random data to ``path``.

    Never holds more than ~1 MiB in memory; returns the blob's ``sha256:`` digest.
    Content is deterministic per ``seed`` and incompressible in practice (each
    1 MiB chunk differs), so gzip on the path cannot cheat.
    """
    rng = random.Random(seed)
    base = bytearray(rng.randbytes(_CHUNK))
    header = tarfile.TarInfo(name)
    header.size = size
    header.mtime = 0
    header.mode = 0o644
    header.uname = header.gname = "root"
    header_bytes = header.tobuf(format=tarfile.GNU_FORMAT)
    h = hashlib.sha256()
    with open(path, "wb") as f:

        def put(b: bytes | bytearray) -> None:
            h.update(b)
            f.write(b)

        put(header_bytes)
        written = 0
        counter = 0
        while written < size:
            base[0:8] = counter.to_bytes(8, "little")
            counter += 1
            n = min(_CHUNK, size - written)
            put(base if n == _CHUNK else bytes(base[:n]))
            written += n
        pad = (-size) % tarfile.BLOCKSIZE
        put(b"\0" * (pad + 2 * tarfile.BLOCKSIZE))
    return "sha256:" + h.hexdigest()


def make_big_oci_layout(
    layout_dir: os.PathLike[str] | str,
    layer_sizes: Sequence[int],
    tag: str = "latest",
    *,
    seed: int = 0,
    small_layers: Iterable[bytes] = (),
) -> ImageInfo:
    """Like :func:`make_oci_layout` for huge layers (e.g. 1 GiB), written by streaming.

    ``layer_sizes`` are the sizes of the *files* inside each tar layer (the blob
    is 1.5 KiB+ larger); ``small_layers`` are added first, in memory.  For an
    uncompressed layer the diff_id equals the blob digest.
    """
    layout = pathlib.Path(layout_dir)
    blobs = _blob_dir(layout)
    entries: list[tuple[str, int, str]] = []
    diff_ids: list[str] = []
    for raw in small_layers:
        d = _write_blob(layout, raw)
        entries.append((d, len(raw), OCI_LAYER))
        diff_ids.append(d)
    for i, size in enumerate(layer_sizes):
        tmp = blobs / f".tmp-{os.getpid()}-{i}"
        digest = write_big_tar_layer(tmp, size, seed=seed * 1000 + i, name=f"big{i}.bin")
        final = blobs / digest.split(":", 1)[1]
        os.replace(tmp, final)
        entries.append((digest, final.stat().st_size, OCI_LAYER))
        diff_ids.append(digest)
    return _finish_layout(layout, tag, entries, diff_ids, None)


def skopeo_copy(
    src: str,
    dest: str,
    *,
    src_creds: str | None = None,
    dest_creds: str | None = None,
    src_tls_verify: bool = False,
    dest_tls_verify: bool = False,
    src_cert_dir: os.PathLike[str] | str | None = None,
    dest_cert_dir: os.PathLike[str] | str | None = None,
    policy: os.PathLike[str] | str | None = None,
    preserve_digests: bool = True,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run ``skopeo copy`` (e.g. ``oci:DIR:tag`` -> ``docker://127.0.0.1:PORT/repo:tag``); raise on failure.

    Creds are ``USER:PASSWORD`` (no creds means anonymous, never the user's auth
    files).  With a cert dir, TLS verification is turned on against the CA files
    (``*.crt``) in it.  ``preserve_digests`` (default) makes the pushed manifest
    and blobs byte-identical to the layout's, so :class:`ImageInfo` digests hold.
    """
    cmd = ["skopeo", "--insecure-policy"] if policy is None else ["skopeo", "--policy", str(policy)]
    cmd += ["copy", "--retry-times", "0"]
    if preserve_digests:  # else skopeo gzips uncompressed layers for docker:// and digests change
        cmd += ["--preserve-digests"]
    if src.startswith("docker://"):
        if src_cert_dir is not None:
            cmd += ["--src-cert-dir", str(src_cert_dir), "--src-tls-verify=true"]
        else:
            cmd += [f"--src-tls-verify={'true' if src_tls_verify else 'false'}"]
        cmd += ["--src-creds", src_creds] if src_creds else ["--src-no-creds"]
    if dest.startswith("docker://"):
        if dest_cert_dir is not None:
            cmd += ["--dest-cert-dir", str(dest_cert_dir), "--dest-tls-verify=true"]
        else:
            cmd += [f"--dest-tls-verify={'true' if dest_tls_verify else 'false'}"]
        cmd += ["--dest-creds", dest_creds] if dest_creds else ["--dest-no-creds"]
    cmd += [src, dest]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(
            f"skopeo failed ({proc.returncode}): {' '.join(cmd)}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc
