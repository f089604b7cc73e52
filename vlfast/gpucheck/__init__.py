"""`python -m vlfast.gpucheck`: the GPU backends against the float64 reference and timed against
the alternatives, on a machine with a CUDA device (see __main__)."""
