"""Authentication and authorization: SCRAM exchanges, ACLs (pure; the broker applies them)."""
