"""Gateway: calls the provider a route names, with retries, fallbacks and circuit breakers."""
