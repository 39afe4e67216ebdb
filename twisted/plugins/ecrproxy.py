"""twistd plugin: `twistd -n ecrproxy --help`. The code lives in ecr_twisted.app.options."""

from twisted.application.service import ServiceMaker

ecrproxy = ServiceMaker(
    "ecr-twisted",
    "ecr_twisted.app.options",
    "Streaming reverse proxy publishing a private AWS ECR registry on your own domain",
    "ecrproxy",
)
