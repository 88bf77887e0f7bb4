"""sam-batch's measurements, kept out of the wheel: run from the checkout's root, by the make
targets or as `python -m benchmarks.<module>`; each module's docstring says what it measures."""
