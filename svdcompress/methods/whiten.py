"""SVD-LLM truncation-aware data whitening."""

from svdcompress.config import WhitenConfig
from svdcompress.linalg import whitened_svd
from svdcompress.methods import register


def factorize(weight, rank, stats, extra, config):
    return whitened_svd(weight, stats.gram, rank)


register(WhitenConfig, factorize)
