"""Test support: real brokers, tiny models, bundles. Imported by tests and bench scripts."""
