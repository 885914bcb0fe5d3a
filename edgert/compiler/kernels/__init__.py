"""Hand-written TIR kernels: quantized GEMV/GEMM (`quant`), int8 dot products (`int8`),
seq2seq attention (`seq2seq`)."""
