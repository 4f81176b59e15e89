"""Tools around the product, not the product's core: the demo, child processes for it and the end-to-end
tests, registered demo clients, a verifying webhook receiver."""
