"""micronet: compress neural networks and deploy them."""

__version__ = "2.0.0.dev0"


def quant_test_manual():
    """Build the original's hand-quantized LeNet examples and check they compute."""
    from micronet.quant_examples import quant_test_manual as run

    return run()


def quant_test_auto():
    """Quantize the original's LeNet with ``prepare`` and check it computes."""
    from micronet.quant_examples import quant_test_auto as run

    return run()
