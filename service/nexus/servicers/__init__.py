"""One servicer module per proto service: validate, call one stored function, map the result."""
