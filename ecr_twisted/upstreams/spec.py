"""One upstream registry as plain values: what it is, how the proxy authenticates to it, how clients reach it.

Made by `app.options` from a `[[upstream]]` table of the `--config` file (or, without one,
`implicit` from --registry-id/--region/--upstream) and read by the composition root, the
router and the token keepers. Values only: nothing here opens a file or a connection.

The config file's table, keys spelled as on the command line (dashes)::

    [[upstream]]
    name = "prod"                     # [a-z0-9][a-z0-9-]{0,31}: metrics label, logs
    registry-id = "111111111111"      # an ECR registry: account ...
    region = "eu-west-1"              # ... and region (default: --region)
    url = "https://..."               # registry URL: any registry (kind "registry"), or, for ECR,
                                      # instead of the token's proxyEndpoint (VPC endpoints, tests)
    kind = "ecr"                      # optional: "ecr" when registry-id/region are given, else "registry"
    credentials = "default"           # default | profile | role (ECR); static | none (registry)
    profile = "prod"                  # credentials = "profile" (or the base of a role)
    role-arn = "arn:aws:iam::...:role/x"  # credentials = "role": assumed with the default chain (or profile)
    external-id = "..."               # optional, role
    session-name = "ecr-twisted"      # optional, role
    username = "..."                  # credentials = "static"
    password-file = "/run/secrets/x"  # credentials = "static" (or password = "...")
    ecr-endpoint-url = "http://..."   # optional: the ECR API endpoint (tests: moto)
    sts-endpoint-url = "http://..."   # optional: the STS endpoint (tests: moto)
    prefix = "prod"                   # clients write registry.example.com/prod/<repo>
    hosts = ["prod.registry.example.com"]  # clients write prod.registry.example.com/<repo>
    default = false                   # at most one: names that match no prefix go here
    optional = false                  # true: /readyz does not wait for this upstream's token

Public names: the access policy, the cache, the access log and metrics see one name per
repository whatever way a client reached it: `<namespace>/<repository>` where the namespace is
the upstream's prefix (or its name when it has only host names), and the bare repository name
on the default upstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["UpstreamSpec", "ECR", "REGISTRY", "CREDENTIALS", "DEFAULT_NAME", "implicit"]

ECR = "ecr"
REGISTRY = "registry"
CREDENTIALS = frozenset({"default", "profile", "role", "static", "none"})
DEFAULT_NAME = "default"  # the one upstream of a proxy configured without an upstream list


@dataclass(frozen=True)
class UpstreamSpec:
    name: str
    kind: str = ECR
    registry_id: str | None = None
    region: str | None = None
    url: str | None = None
    credentials: str = "default"
    profile: str | None = None
    role_arn: str | None = None
    external_id: str | None = None
    session_name: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # a secret: never shown
    ecr_endpoint_url: str | None = None
    sts_endpoint_url: str | None = None
    prefix: str | None = None
    hosts: tuple[str, ...] = ()
    default: bool = False
    optional: bool = False

    @property
    def namespace(self) -> str:
        """What public names of this upstream start with ("" for the default upstream)."""
        if self.default:
            return ""
        return self.prefix or self.name


def implicit(
    registry_id: str | None, region: str | None, url: str | None, ecr_endpoint_url: str | None
) -> UpstreamSpec:
    """The single upstream of a proxy without an upstream list: today's behaviour, unchanged."""
    return UpstreamSpec(
        DEFAULT_NAME, ECR, registry_id=registry_id, region=region, url=url, ecr_endpoint_url=ecr_endpoint_url,
        default=True,
    )
