"""Metrics, health and readiness."""
