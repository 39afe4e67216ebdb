"""A 1 GiB layer pushed and pulled through the proxy with skopeo, in constant memory.

The proxy streams: its resident set must stay flat while a gigabyte moves through it.
RSS is sampled from /proc every 0.2 s; VmHWM (the kernel's high-water mark) catches any
spike between samples. Figures are printed (``pytest -s``) and written to the test's tmp dir.

The only 1 GiB round trip of the suite (~1-2 minutes: moto's S3 is slow).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import time
from collections.abc import Iterator

import pytest
from proxy_harness import (
    MIB,
    ProxyFactory,
    RssSampler,
    assert_layout_matches,
    pull_via,
    push_via,
)

from ecr_twisted.testing.emulator import EmulatedECR
from ecr_twisted.testing.images import make_big_oci_layout

GIB = 1 << 30
PEAK_LIMIT = 100 * MIB
GROWTH_LIMIT = 30 * MIB


@pytest.fixture
def big_ecr(tmp_path: pathlib.Path) -> Iterator[EmulatedECR]:
    """An emulator of its own, so moto lets go of the gigabyte when the test ends."""
    with EmulatedECR(tmp_path / "ecr") as emu:
        yield emu


@pytest.mark.slow
def test_one_gib_layer_roundtrip_in_constant_memory(
    big_ecr: EmulatedECR, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    src, dest = tmp_path / "src", tmp_path / "pulled"
    try:
        info = make_big_oci_layout(src, [GIB], "big", small_layers=[b"a small first layer\n"])
        assert info.layer_sizes[-1] > GIB
        p = proxy_factory(big_ecr)
        assert p.request("/v2/").status == 200  # warm: first request, token in hand
        baseline = p.rss()

        t0 = time.monotonic()
        with RssSampler(p, 0.2) as push_rss:
            push_via(p, info, "big/layer", timeout=600)
        push_seconds = time.monotonic() - t0
        after_push = p.rss()

        t0 = time.monotonic()
        with RssSampler(p, 0.2) as pull_rss:
            pull_via(p, "big/layer", "big", dest, timeout=600)
        pull_seconds = time.monotonic() - t0

        hwm = p.hwm()
        figures = {
            "baseline_rss_mib": round(baseline / MIB, 1),
            "peak_push_rss_mib": round(push_rss.peak / MIB, 1),
            "rss_after_push_mib": round(after_push / MIB, 1),
            "peak_pull_rss_mib": round(pull_rss.peak / MIB, 1),
            "vm_hwm_mib": round(hwm / MIB, 1),
            "push_seconds": round(push_seconds, 1),
            "pull_seconds": round(pull_seconds, 1),
            "samples_push": len(push_rss.samples),
            "samples_pull": len(pull_rss.samples),
            "layer_bytes": info.layer_sizes[-1],
        }
        (tmp_path / "rss.json").write_text(json.dumps(figures, indent=2), encoding="utf-8")
        print(f"\n1 GiB through the proxy: {json.dumps(figures)}\n(written to {tmp_path / 'rss.json'})")

        # every byte made it, both ways (sha256 recomputed over the pulled gigabyte)
        assert_layout_matches(dest, "big", info, compare_bytes=False)
        big = dest / "blobs" / "sha256" / info.layer_digests[-1].split(":", 1)[1]
        assert big.stat().st_size == info.layer_sizes[-1]

        assert push_rss.samples and pull_rss.samples
        for what, peak in (("push", push_rss.peak), ("pull", pull_rss.peak), ("VmHWM", hwm)):
            assert peak < PEAK_LIMIT, f"{what}: {peak / MIB:.1f} MiB resident"
            assert peak - baseline < GROWTH_LIMIT, f"{what}: grew {(peak - baseline) / MIB:.1f} MiB over baseline"
        assert p.metric("ecrproxy_requests_in_flight") == 0
    finally:
        # 2+ GiB of layouts: do not leave them to pytest's tmp retention
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dest, ignore_errors=True)
