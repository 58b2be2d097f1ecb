"""Optional CUDA kernels (built by the top-level CMakeLists.txt) with pure-PyTorch reference fallbacks."""
