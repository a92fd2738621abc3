"""ASVD: activation-aware scaling of input channels before the SVD."""

from svdcompress.config import ASVDConfig
from svdcompress.linalg import scaled_svd
from svdcompress.methods import register


def factorize(weight, rank, stats, extra, config):
    return scaled_svd(weight, stats.abs_mean.pow(config.alpha), rank)


register(ASVDConfig, factorize)
