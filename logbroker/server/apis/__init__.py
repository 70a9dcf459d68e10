"""The request layer: protocol-neutral broker calls under every listener (see broker_apis.py)."""
