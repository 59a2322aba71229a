"""What crosses the process boundary: message kinds, the array codec, endpoints, segments."""
