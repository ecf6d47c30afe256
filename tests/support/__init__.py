"""Support code for the tests."""
