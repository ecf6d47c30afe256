"""The guest agent: runs inside a database instance and reports to the conductor.

It holds only the broker URL and its own instance's credentials, and never imports the
control plane's database layer.
"""
