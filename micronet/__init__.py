"""micronet: compress neural networks and deploy them."""

__version__ = "2.0.0.dev0"


def quant_test_manual(method: str = "iao"):
    """Build the original's hand-quantized LeNet examples and check they compute (method: iao, dorefa, wbwtab)."""
    from micronet.quant_examples import quant_test_manual as run

    return run(method)


def quant_test_auto(method: str = "iao"):
    """Quantize the original's LeNet with ``prepare`` and check it computes (method: iao, dorefa, wbwtab)."""
    from micronet.quant_examples import quant_test_auto as run

    return run(method)
