"""twistd plugin: `twistd -n ecrproxy --help`.

Only names the tap: `ecr_twisted.app.options` provides `Options` and `makeService`, and
everything is built by `ecr_twisted.app.build`. Kept this small because twistd imports
every plugin module to list them.
"""

from twisted.application.service import ServiceMaker

__all__ = ["ecrproxy"]

ecrproxy = ServiceMaker(
    "ecr-twisted",
    "ecr_twisted.app.options",
    "Streaming reverse proxy publishing a private AWS ECR registry on your own domain",
    "ecrproxy",
)
