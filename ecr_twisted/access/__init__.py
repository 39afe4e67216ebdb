"""Who may do what: the gate, the auth modes, the policy, credentials and tokens."""
