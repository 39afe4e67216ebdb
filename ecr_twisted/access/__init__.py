"""Who may do what: every registry request is decided here before anything goes upstream.

- gate.py: the `Gate` the handler asks, and what every `--auth` mode shares
- modes.py: one object per `--auth` mode (none, basic, token, passthrough, webhook)
- decision.py: the gate's answers and the facts it decides on
- policy.py: the access policy (rules, presets, the policy file)
- targets.py: mount and `?tag=` parameters of request targets
- credentials.py, htpasswd.py, throttle.py, tokens.py, webhook.py: the parts modes are built from
"""

__all__: list[str] = []
