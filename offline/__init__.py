"""Offline calibrator of rotquant: fold, rotate, quantize, write, and evaluate (no vLLM needed)."""
