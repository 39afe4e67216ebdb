"""Options, the composition root that builds the service tree, and the worker processes."""
