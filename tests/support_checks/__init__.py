"""Checks of the test-support code itself."""
