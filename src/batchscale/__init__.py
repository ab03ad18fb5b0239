"""batchscale: batch-softmax contrastive training of sentence encoders at any batch size."""

__version__ = "0.1.0"
