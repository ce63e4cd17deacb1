"""Test doubles for the unit tier: an in-memory transport, a stub classifier, a service harness."""
