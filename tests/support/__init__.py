"""Helpers for tests: private servers for fault tests."""
