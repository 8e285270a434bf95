"""vitjax's own compute kernels, for where XLA's are slow.

`cpu_int8`: an int8 x int8 -> int32 matmul for XLA's CPU backend (an XLA FFI
custom call with an AVX-512 VNNI microkernel, compiled on first use).
"""
