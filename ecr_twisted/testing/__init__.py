"""Test doubles, the emulated ECR and image builders: shipped so users' tests can reuse them."""
