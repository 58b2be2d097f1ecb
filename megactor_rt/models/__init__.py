"""Pure nn.Module implementations of every MegActor v1 network."""
