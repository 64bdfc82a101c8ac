"""DoReFa k-bit weights and activations (:mod:`.quantize`)."""
