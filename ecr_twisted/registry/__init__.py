"""The registry API: routes and errors as data, listings, and the handler that alone talks upstream."""
