"""Compression methods: quantization (and, as they land, pruning and fusion)."""
