"""SVD-LLM truncation-aware data whitening."""

from svdcompress.config import WhitenConfig
from svdcompress.errors import ConfigError
from svdcompress.linalg import blended_target, gram_eigen, needs_gram_eigen, whitened_svd
from svdcompress.methods import register


def factorize(weight, rank, stats, extra, config):
    if config.error_blend > 0:
        if stats.cross is None:  # compress_ and streaming track the original stream for it
            raise ConfigError("error_blend > 0 needs the original model's inputs beside the "
                              "compressed model's (ModuleStats.cross); gather the statistics with "
                              "the original stream tracked (WhitenConfig.tracks_original).")
        weight = blended_target(weight, stats.gram, stats.cross, config.error_blend)
    # q/k/v (and gate/up) share one Gram matrix: decompose it once for those that need it.
    eigen = stats.from_gram("eigen", gram_eigen, needed=needs_gram_eigen(weight.shape))
    return whitened_svd(weight, stats.gram, rank, eigen=eigen)


register(WhitenConfig, factorize)
