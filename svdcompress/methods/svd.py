"""Plain truncated SVD: keep the largest singular values."""

from svdcompress.config import SVDConfig
from svdcompress.linalg import truncated_svd
from svdcompress.methods import register


def factorize(weight, rank, stats, extra, config):
    return truncated_svd(weight, rank)


register(SVDConfig, factorize)
