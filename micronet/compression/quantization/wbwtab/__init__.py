"""Binary/ternary weights and binary activations (:mod:`.quantize`)."""
