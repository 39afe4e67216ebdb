"""ecr-twisted: a streaming reverse proxy that publishes private AWS ECR registries on your own domain."""

__version__ = "0.1.0"
VERSION = __version__  # for importers (a leading underscore reads as private)
