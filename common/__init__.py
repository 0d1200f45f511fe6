"""What ClientApp, ServerApp and the runners share: the config and the message schema."""
