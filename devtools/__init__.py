"""The checkout's own harness: the demo, the local development stack, and the in-memory builders the tests and
benchmarks share (not installed with the product).

Everything here needs the test extras (moto's server) and a checkout (the examples folder); it runs from the
repository root (``python -m devtools.demo``), and the tests and benchmarks import it from there.
"""
