"""Orthogonal rotations for rotation-based quantization (QuaRot): Hadamard matrices and their fast application."""
