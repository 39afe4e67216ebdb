"""HTTP/1.1 on both legs: parsing and connection policy, the server and upstream connections, the exchange."""
