"""Running the proxy: options read into settings, the composition root that builds one
process's service tree from them, and the --workers supervisor and children."""
