"""Training with DCP: the ``dcp-train`` command line and its data loaders."""
