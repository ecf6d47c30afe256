"""Worker roles: conductor, taskmanager, guest agent."""
